"""Two demo jobs submitted at once to a real `gesso serve`, driven over HTTP as a client would: they run one after the
other; the event stream gives every step once, in order, and resumes from Last-Event-ID with no gap; save-now,
sample-now and stop write their files and events; the finished LoRA downloads byte-equal to the file on disk."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serve_testutil import DEMO_DIR, ROOT, Server, is_step, read_events

pytestmark = pytest.mark.slow  # two short training jobs and a server start: about a minute on 2 cores


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The session a client has with the server, recorded for the tests below. The server runs in an empty folder and
    its jobs train on a copy of the demo images, both watched: it must write in its data folder alone."""
    tmp = tmp_path_factory.mktemp("serve")
    shutil.copytree(DEMO_DIR / "demo", tmp / "images" / "demo")
    (tmp / "cwd").mkdir()
    images = snapshot(tmp / "images")
    server = Server(tmp / "data", cwd=tmp / "cwd", base=tmp / "images")
    try:
        # 12 steps each: requests sent on seeing step 2 land well before the end even on a fast machine
        first = server.submit("train.epochs=4")
        second = server.submit("train.epochs=4")
        a, b = first["id"], second["id"]
        # job 1: at step 2 save now and preview now; the connection drops after step 3 and comes back
        before = read_events(server, a, until=is_step(2))
        requests = [server.client.post(f"/jobs/{a}/{r}") for r in ("save-now", "sample-now", "validate-now")]
        before += read_events(server, a, until=is_step(3), last_id=before[-1][0])
        after = read_events(server, a, last_id=before[-1][0])
        # job 2: stop at step 2
        stopped = read_events(server, b, until=is_step(2))
        stop = server.client.post(f"/jobs/{b}/stop")
        stopped += read_events(server, b, last_id=stopped[-1][0])
        yield {"server": server, "a": a, "b": b, "before": before, "after": after, "requests": requests, "stopped": stopped,
               "stop": stop, "jobs": {j["id"]: j for j in server.client.get("/jobs").json()["jobs"]},
               "late": read_events(server, a), "images": images, "tmp": tmp}
    finally:
        server.stop()


def test_two_jobs_submitted_at_once_run_one_after_the_other(run):
    a, b = run["jobs"][run["a"]], run["jobs"][run["b"]]
    assert (a["status"], b["status"]) == ("finished", "stopped") and a["device"] == b["device"] == "cpu"
    assert a["ended_at"] <= b["started_at"]  # one job at a time on the CPU
    statuses = [e["status"] for _, e in run["late"] if e["event"] == "status"]
    assert statuses == ["queued", "running", "finished"]
    # the listing's live fields, from the last step
    assert (a["step"], a["total_steps"], a["epoch"], a["eta_s"]) == (12, 12, 4, 0.0) and a["loss"] > 0


def test_the_server_wrote_in_its_data_folder_alone(run):
    tmp = run["tmp"]
    assert snapshot(tmp / "images") == run["images"]  # no cache beside the images (the default cache_dir would be)
    assert list((tmp / "cwd").iterdir()) == []  # nothing relative to its working folder
    assert {p.name for p in (tmp / "data").iterdir()} <= {"jobs.db", "jobs.db-wal", "jobs.db-shm", "server.lock", "jobs", "cache"}
    assert sorted(p.name for p in (tmp / "data" / "jobs").iterdir()) == [str(run["a"]), str(run["b"])]
    assert any((tmp / "data" / "cache").rglob("*.safetensors"))  # the latents went to the server's own cache
    job = run["server"].client.get(f"/jobs/{run['a']}").json()
    assert job["config"]["dataset"]["cache_dir"] == str((tmp / "data" / "cache").resolve()) and job["notices"] == []


def test_the_stream_gives_every_step_once_in_order_and_resumes_after_a_disconnect_with_no_gap(run):
    joined = run["before"] + run["after"]
    ids = [seq for seq, _ in joined]
    assert ids == list(range(1, len(ids) + 1))  # two reconnections (Last-Event-ID), nothing missed, nothing twice
    assert [e["step"] for _, e in joined if e["event"] == "step"] == list(range(1, 13))
    assert run["before"][-1][1] == {**run["before"][-1][1], "event": "step", "step": 3}
    assert run["late"] == joined  # a client connecting after the end sees the whole run, as it happened
    again = run["server"].client.get(f"/jobs/{run['a']}/events", headers={"Last-Event-ID": str(ids[-1])})
    assert again.status_code == 204  # ended and all sent: a browser's EventSource stops reconnecting


def answered(events: list[dict]) -> tuple[int, list[dict]]:
    """The step boundary the requests were answered at (the first after they reached the job), and the events from
    that step's event to the next step's."""
    first = next(e for e in events if e["event"] == "control")
    start = next(i for i, e in enumerate(events) if e["event"] == "step" and e["step"] == first["step"])
    end = next((i for i, e in enumerate(events) if i > start and e["event"] == "step"), len(events))
    return first["step"], events[start + 1:end]


def test_save_now_and_sample_now_write_their_files_and_events(run):
    assert [r.status_code for r in run["requests"]] == [202, 202, 202]
    step, events = answered([e for _, e in run["before"] + run["after"]])
    assert 2 <= step < 12  # asked once step 2's event was seen: answered at the next boundary the job reached
    output = Path(run["jobs"][run["a"]]["output_dir"])
    # the requests' answers come first at that boundary (an epoch's own files, at steps 3, 6, 9, after them)
    assert [(e["event"], e.get("kind") or e.get("request"), Path(e.get("path") or "").name) for e in events[:6]] == [
        ("save", "step", f"demo-step{step:08d}.safetensors"), ("save", "state", "state.pt"), ("control", "save_now", ""),
        ("save", "preview", f"demo-step{step:08d}-00.png"), ("control", "sample_now", ""), ("control", "validate_now", "")]
    assert {e["step"] for e in events[:6]} == {step} and events[5]["done"] is False
    assert (output / f"demo-step{step:08d}.safetensors").is_file() and (output / "samples" / f"demo-step{step:08d}-00.png").is_file()
    listed = {f["path"]: f["kind"] for f in run["server"].client.get(f"/jobs/{run['a']}/files").json()["files"]}
    assert {f"demo-step{step:08d}.safetensors": "lora", f"samples/demo-step{step:08d}-00.png": "preview",
            "demo.safetensors": "lora", "metrics.jsonl": "metrics", "state.pt": "state", "worker.log": "log"}.items() <= listed.items()
    assert not any(name.startswith(".") or "/." in name for name in listed)  # the lock and temporary files are not listed


def test_stop_saves_the_state_and_ends_the_job_stopped(run):
    assert run["stop"].status_code == 202
    events = [e for _, e in run["stopped"]]
    step, after = answered(events)
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, step + 1))  # nothing after its boundary
    assert [(e["event"], e.get("request") or e.get("kind") or e.get("status")) for e in after] == [
        ("control", "stop"), ("save", "state"), ("status", "stopped")]
    output = Path(run["jobs"][run["b"]]["output_dir"])
    assert Path(after[1]["path"]) == output / "state.pt" and (output / "state.pt").is_file()
    assert not (output / "demo.safetensors").exists() and run["jobs"][run["b"]]["step"] == step
    # a stopped job takes no more requests
    again = run["server"].client.post(f"/jobs/{run['b']}/save-now")
    assert again.status_code == 409 and again.json()["error"] == f"job {run['b']} is stopped, not running"


def test_the_finished_lora_downloads_byte_equal_and_paths_out_of_the_folder_are_refused(run):
    client, a = run["server"].client, run["a"]
    final = Path(run["jobs"][a]["output_dir"]) / "demo.safetensors"
    r = client.get(f"/jobs/{a}/files/demo.safetensors")
    assert r.status_code == 200 and r.content == final.read_bytes()
    step, _ = answered([e for _, e in run["late"]])
    preview = client.get(f"/jobs/{a}/files/samples/demo-step{step:08d}-00.png")
    assert preview.status_code == 200 and preview.content[:8] == b"\x89PNG\r\n\x1a\n"
    for path in ("..%2F..%2Fjobs.db", "samples/..%2F..%2F..%2Fjobs.db", "%2E%2E/server.lock"):
        refused = client.get(f"/jobs/{a}/files/{path}")
        assert refused.status_code == 400 and refused.json()["key"] == "path" and "'..'" in refused.json()["error"]
    assert client.get(f"/jobs/{a}/files/.gesso.lock").status_code == 404


def test_the_readme_client_trains_the_demo_saves_at_step_2_and_downloads_the_final_file(run, tmp_path):
    section = (ROOT / "README.md").read_text().split("## Training service", 1)[1].split("\n## ", 1)[0]
    (tmp_path / "client.py").write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    done = subprocess.run([sys.executable, "client.py", run["server"].url, str(ROOT / "examples" / "demo.toml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    job = max(j["id"] for j in run["server"].client.get("/jobs").json()["jobs"])
    output = Path(run["server"].client.get(f"/jobs/{job}").json()["output_dir"])
    assert [line.split(" loss")[0] for line in lines if line.startswith("step ")] == [f"step {i}/6" for i in range(1, 7)]
    saved = [line for line in lines if line.startswith("save step ")]
    assert len(saved) == 1 and Path(saved[0].split()[-1]).is_file()  # the save-now's file, at the boundary after step 2
    assert "control save_now saved " in done.stdout and lines[-2] == "status finished wrote demo.safetensors"
    assert (tmp_path / "demo.safetensors").read_bytes() == (output / "demo.safetensors").read_bytes()
    assert lines[-1].startswith("downloaded demo.safetensors of [") and "'demo.safetensors'" in lines[-1]
