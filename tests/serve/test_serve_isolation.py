"""One job's failure is that job's alone: a run whose loss turns NaN, and a job process killed as the kernel's
out-of-memory killer kills one, each end their job `failed` with the reason, and the server goes on to the next job."""
import os
import signal

import pytest
from serve_testutil import Server, is_step, read_events

pytestmark = pytest.mark.slow  # three short jobs and a server start


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("isolation") / "data")
    yield server
    server.stop()


def test_a_diverging_job_and_a_killed_one_fail_alone_and_the_next_job_runs(server):
    nan = server.submit("train.learning_rate=1e6", "train.max_grad_norm=0", "train.epochs=2")["id"]
    killed = server.submit("train.epochs=4")["id"]  # 12 steps: killed after the first
    fine = server.submit("train.epochs=1")["id"]

    failed = server.wait(nan, "failed", "finished")
    assert failed["status"] == "failed" and failed["error"].startswith("loss is nan at step "), failed["error"]
    assert "lower train.learning_rate" in failed["error"]

    read_events(server, killed, until=is_step(1))
    pid = server.client.get(f"/jobs/{killed}").json()["pid"]
    os.kill(pid, signal.SIGKILL)  # what the out-of-memory killer does
    ended = server.wait(killed, "failed", "finished")
    assert ended["status"] == "failed"
    assert ended["error"] == "the job's process was killed by SIGKILL (the system may have run out of memory); see worker.log"

    assert server.wait(fine, "finished", "failed")["status"] == "finished"
    assert server.proc.poll() is None and server.client.get("/jobs").status_code == 200  # the server lives on
    # the reasons are in the event history too, as the last status event of each job
    for job, status in ((nan, "failed"), (killed, "failed"), (fine, "finished")):
        last = [e for _, e in read_events(server, job)][-1]
        assert last["event"] == "status" and last["status"] == status

    # a failed job resumes on request, from its last state (here: none, so from the start), and is queued again
    resumed = server.client.post(f"/jobs/{killed}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    assert server.wait(killed, "finished", "failed")["status"] == "finished"
