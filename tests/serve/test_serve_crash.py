"""kill -9 of `gesso serve` in the middle of a job, then a new server on the same data folder: the queue is intact,
the job resumes from its state, and its final LoRA equals an uninterrupted run's, tensor for tensor. And a server
stopped as a service manager stops it (SIGTERM): its job is queued again, and the next start finishes it.

The killed server's job process sees its stdin end, stops at its next step boundary with the state saved, and ends;
the new server waits for it, queues the job again, and its new process goes on from that state."""
from pathlib import Path

import signal

import pytest
import torch
from serve_testutil import Server, is_step, read_events

import gesso

pytestmark = pytest.mark.slow  # two server starts, a 12-step job in two halves, a short job and the reference run


def test_a_job_survives_kill_9_of_the_server_and_ends_as_an_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    first = Server(data)
    try:
        job = first.submit("train.epochs=4")["id"]  # 12 steps, a state at each epoch's end
        queued = first.submit("train.epochs=1")["id"]
        read_events(first, job, until=is_step(5))  # in the middle of epoch 2
        first.kill()
        second = Server(data)
    except BaseException:
        first.stop()  # and the job processes it left
        raise
    try:
        listed = {j["id"]: j for j in second.client.get("/jobs").json()["jobs"]}
        assert set(listed) == {job, queued} and listed[queued]["status"] == "queued"  # the queue, as it was
        history = [e for _, e in read_events(second, job)]  # the whole run: both servers' parts
        done = second.wait(queued, "finished")  # the queue goes on after it
        final = second.client.get(f"/jobs/{job}").json()
    finally:
        second.stop()

    assert final["status"] == "finished" and done["started_at"] >= final["ended_at"]
    statuses = [(e["status"], e["message"]) for e in history if e["event"] == "status"]
    assert statuses[:2] == [("queued", None), ("running", "on cpu")]
    assert statuses[2] == ("queued", "the server started again: the job goes on from its last state")
    assert statuses[3:] == [("running", "on cpu"), ("finished", "wrote demo.safetensors")]
    starts = [e["step"] for e in history if e["event"] == "start"]
    assert len(starts) == 2 and 5 <= starts[1] < 12  # resumed from the state saved when the first process stopped
    assert [e["step"] for e in history if e["event"] == "step"] == list(range(1, 13))  # every step once: none lost or redone
    assert "resuming at epoch" in (Path(final["output_dir"]) / "worker.log").read_text()

    reference = gesso.train(gesso.build_config(final["config"]), tmp_path / "reference", progress=False)
    a, b = gesso.read_lora(reference.final)[0], gesso.read_lora(Path(final["output_dir"]) / "demo.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_server_stopped_with_sigterm_queues_its_job_again_and_the_next_start_finishes_it(tmp_path):
    data = tmp_path / "data"
    first = Server(data)
    try:
        job = first.submit("train.epochs=4")["id"]  # 12 steps
        read_events(first, job, until=is_step(2))
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=120) == 128 + signal.SIGTERM, first.output()
        assert "interrupted (SIGTERM)" in first.output()
        second = Server(data)
    except BaseException:
        first.stop()  # and the job processes it left
        raise
    try:
        history = [e for _, e in read_events(second, job)]
    finally:
        second.stop()
    statuses = [(e["status"], e["message"]) for e in history if e["event"] == "status"]
    # queued again by the stopping server itself (its job stopped within its wait), not by the next one's recovery
    assert statuses[2] == ("queued", "the server shut down: the job goes on from its last state at its next start")
    assert statuses[-1] == ("finished", "wrote demo.safetensors") and len(statuses) == 5
    assert [e["step"] for e in history if e["event"] == "step"] == list(range(1, 13))
