"""The queue in SQLite and the checks before it, without a server: each status moves only from where it may, events
are numbered 1, 2, ... per job even with two processes writing at once, a submitted config is checked and told where
the server writes, and a client's file path never leaves the job's folder."""
import json
import multiprocessing
import os
import sqlite3

import pytest
from serve_testutil import DEMO_DIR, DEMO_TOML

from gesso.engine.config.load import build_config
from gesso.serve.jobs import RequestError, check_config, error_key, job_file, job_files, relative_path
from gesso.serve.store import Store


def test_each_status_moves_only_from_where_it_may(tmp_path):
    store = Store(tmp_path / "jobs.db")
    a = store.submit("a", {}, {}, [], tmp_path / "jobs")["id"]
    b = store.submit("b", {}, {}, ["a notice"], tmp_path / "jobs")["id"]
    assert store.job(a)["output_dir"] == str(tmp_path / "jobs" / str(a))
    assert not store.end(a, "finished") and not store.resume(a)  # queued: neither ends nor resumes
    assert store.claim_next("cpu")["id"] == a  # the oldest first
    assert not store.cancel(a)  # running: stop it, not cancel
    assert store.cancel(b) and store.claim_next("cpu") is None  # nothing left queued
    assert store.end(a, "failed", "loss is nan") and not store.end(a, "finished")  # ended once
    assert store.job(a)["error"] == "loss is nan" and store.resume(a) and store.job(a)["status"] == "queued"
    assert store.claim_next("cuda:1")["device"] == "cuda:1" and store.requeue(a, "restart")
    statuses = [json.loads(d)["status"] for _, d in store.events_after(a, 0)]
    assert statuses == ["queued", "running", "failed", "queued", "running", "queued"]
    assert [s for s, _ in store.events_after(b, 0)] == [1, 2]  # queued (with its notice), cancelled
    assert store.job(b)["status"] == "cancelled" and store.job(b)["notices"] == ["a notice"]


def _add(path, job, n):
    store = Store(path)
    for i in range(n):
        store.add_event(job, {"event": "step", "step": i, "writer": os.getpid()})


def test_two_processes_writing_events_at_once_number_them_without_gap_or_repeat(tmp_path):
    path = tmp_path / "jobs.db"
    job = Store(path).submit("a", {}, {}, [], tmp_path)["id"]
    ctx = multiprocessing.get_context("fork")  # the children need only the store, already imported here
    writers = [ctx.Process(target=_add, args=(path, job, 150)) for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=300)
    assert [w.exitcode for w in writers] == [0, 0]
    rows = Store(path).events_after(job, 0, limit=1000)
    assert [seq for seq, _ in rows] == list(range(1, 302))  # the submit's status event, then 300 steps


def test_a_submitted_config_is_checked_and_writes_only_in_the_data_folder(tmp_path):
    toml = DEMO_TOML.replace("[output]", "[output]\ndir = '/somewhere/else'").replace("[dataset]", "[dataset]\ncache_dir = '/tmp/c'")
    config, notices = check_config(toml, ["train.epochs=1"], str(DEMO_DIR), tmp_path / "data")
    assert config["dataset"]["cache_dir"] == str((tmp_path / "data").resolve() / "cache")
    assert config["output"]["dir"] == "" and config["train"]["epochs"] == 1
    assert [n.split(" ")[0] for n in notices] == ["output.dir", "dataset.cache_dir"]
    assert build_config(config) == build_config(config, "again")  # the job's process reads it back as it is
    with pytest.raises(RequestError) as e:
        check_config({"dataset": {"path": "demo"}, "network": {"rank": 0}}, [], str(DEMO_DIR), tmp_path / "data")
    assert (e.value.status, e.value.key) == (422, "network.rank")
    assert not (tmp_path / "data").exists()  # checking writes nothing


@pytest.mark.parametrize("message, key", [
    ("config: unknown key train.foo (known: epochs, batch_size)", "train.foo"),
    ("config: dataset.subsets[0].path: no such folder: /x/train.toml", "dataset.subsets[0].path"),
    ("config: [sample] must be a table", "sample"),
    ("config: unknown section [datasets] (known: model, dataset)", "datasets"),
    ("model.checkpoint: /no/model.safetensors: no such file", "model.checkpoint"),
    ("something without a key", None),
])
def test_the_key_a_config_error_names(message, key):
    assert error_key(message) == key


def test_a_client_path_never_leaves_the_jobs_folder(tmp_path):
    out = tmp_path / "jobs" / "1"
    (out / "samples").mkdir(parents=True)
    (out / "demo.safetensors").write_bytes(b"lora")
    (out / "samples" / "demo-e000001-00.png").write_bytes(b"png")
    (out / ".gesso.lock").write_text("pid 1")
    (tmp_path / "jobs.db").write_text("secret")
    os.symlink(tmp_path / "jobs.db", out / "link.safetensors")
    assert job_file(out, relative_path("samples/demo-e000001-00.png")) == (out / "samples" / "demo-e000001-00.png").resolve()
    for path in ("../../jobs.db", "samples/../../../jobs.db", "/etc/passwd", "..", "a\\..\\b", "./demo.safetensors", ""):
        with pytest.raises(RequestError) as e:
            relative_path(path)
        assert (e.value.status, e.value.key) == (400, "path")
    for path in (".gesso.lock", "samples/.demo.png.1234abcd.tmp"):
        with pytest.raises(RequestError) as e:
            relative_path(path)
        assert e.value.status == 404
    with pytest.raises(RequestError) as e:
        job_file(out, relative_path("link.safetensors"))  # a link pointing out of the folder
    assert (e.value.status, e.value.message) == (400, "path 'link.safetensors': leads outside the job's folder")
    assert [(f["path"], f["kind"]) for f in job_files(out)] == [("demo.safetensors", "lora"),
                                                                ("samples/demo-e000001-00.png", "preview")]


def test_a_file_that_is_not_our_queue_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "garbage.db").write_bytes(b"not sqlite at all, " * 100)
    with pytest.raises(sqlite3.DatabaseError):
        Store(tmp_path / "garbage.db")
    assert (tmp_path / "garbage.db").read_bytes() == b"not sqlite at all, " * 100
    with sqlite3.connect(tmp_path / "later.db") as db:
        db.execute("PRAGMA user_version = 7")  # a queue a later Gesso wrote
    with pytest.raises(sqlite3.DatabaseError, match="its schema is version 7, this Gesso reads version 2"):
        Store(tmp_path / "later.db")
