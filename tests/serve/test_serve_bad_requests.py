"""Bad requests to a real `gesso serve` holding a token: each gets a 4xx JSON error, one line naming the problem and
the key or field it is in, and nothing changes on disk (its data folder, the dataset's folder). And the two ways
`gesso serve` itself refuses to start: a non-local address without a token, a data folder another server holds."""
import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serve_testutil import DEMO_DIR, DEMO_TOML, SHORT, Server

from gesso import cli

pytestmark = pytest.mark.slow  # a server's start: 10 to 30 s on a loaded 2-core machine

TOKEN = "s3cret-token"


def snapshot(*folders: Path) -> dict[Path, bytes]:
    """Every file's bytes, less SQLite's shared-memory index (jobs.db-shm), where readers note their read marks."""
    return {p: p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file() and not p.name.endswith("-shm")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    shutil.copytree(DEMO_DIR / "demo", tmp / "images" / "demo")
    server = Server(tmp / "data", token=TOKEN)
    server.images = tmp / "images"
    yield server
    server.stop()


def job(config=DEMO_TOML, *overrides: str, base: str | None = None) -> dict:
    return {"config": config, "overrides": [*SHORT, *overrides], "base": base}


CASES = {
    # name: (method, path, keyword arguments of the request, status, key, words the error holds)
    "bad TOML": ("post", "/jobs", lambda s: {"json": job("[train\nepochs = 2", base=str(s.images))}, 400, "config",
                 ["not valid TOML", "line 1"]),
    "unknown key": ("post", "/jobs", lambda s: {"json": job(DEMO_TOML.replace("[train]", "[train]\nlearning_rat = 1e-4"),
                                                            base=str(s.images))},
                    422, "train.learning_rat", ["unknown key train.learning_rat"]),
    "value out of range": ("post", "/jobs", lambda s: {"json": job(DEMO_TOML, "train.learning_rate=-1", base=str(s.images))},
                           422, "train.learning_rate", ["train.learning_rate = -1.0", "must be above 0"]),
    "base not a folder": ("post", "/jobs", lambda s: {"json": job(base=str(s.images / "elsewhere"))}, 422, "base",
                        ["is not an absolute path to a folder"]),
    "missing dataset folder": ("post", "/jobs", lambda s: {"json": job({"dataset": {"path": "no-such-images"}},
                                                                       base=str(s.images))},
                               422, "dataset.path", ["no such folder", "no-such-images"]),
    "missing checkpoint": ("post", "/jobs", lambda s: {"json": job(DEMO_TOML.replace('name = "tiny-sdxl"', 'checkpoint = "/no/base.safetensors"'),
                                                                   base=str(s.images))},
                           422, "model.checkpoint", ["/no/base.safetensors"]),
    "bad override": ("post", "/jobs", lambda s: {"json": job(DEMO_TOML, "epochs", base=str(s.images))}, 422, "overrides",
                     ["expected section.key=value"]),
    "no config": ("post", "/jobs", lambda s: {"json": {"overrides": []}}, 422, "config", ["config: Field required"]),
    "path with ..": ("get", "/jobs/1/files/..%2F..%2Fjobs.db", lambda s: {}, 400, "path", ["'..'"]),
    "no such job": ("get", "/jobs/7", lambda s: {}, 404, "id", ["no job 7"]),
    "oversized body": ("post", "/jobs", lambda s: {"json": job("# " + "x" * (1 << 20))}, 413, "body", ["over 1048576 bytes"]),
    "oversized chunked body": ("post", "/jobs", lambda s: {"content": iter([b"{" + b" " * 65536] * 20)}, 413, "body",
                               ["over 1048576 bytes"]),
    "no token": ("get", "/jobs", lambda s: {"headers": {"Authorization": ""}}, 401, "Authorization", ["no token"]),
    "wrong token": ("get", "/jobs", lambda s: {"headers": {"Authorization": "Bearer guess"}}, 401, "Authorization",
                    ["wrong token"]),
    "no token for the schema": ("get", "/openapi.json", lambda s: {"headers": {"Authorization": ""}}, 401, "Authorization",
                                ["no token"]),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_request_gets_a_4xx_json_error_naming_it_and_nothing_changes_on_disk(server, case):
    method, path, kwargs, status, key, words = CASES[case]
    before = snapshot(server.data, server.images)
    r = getattr(server.client, method)(path, **kwargs(server))
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and set(r.json()) == {"error", "key"}
    error = r.json()["error"]
    assert r.json()["key"] == key and "\n" not in error and all(w in error for w in words), error
    assert snapshot(server.data, server.images) == before
    assert server.client.get("/jobs").json() == {"jobs": []}


def test_with_the_token_the_schema_is_served(server):
    schema = server.client.get("/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/events", "/jobs/{job_id}/stop", "/jobs/{job_id}/save-now",
            "/jobs/{job_id}/sample-now", "/jobs/{job_id}/cancel", "/jobs/{job_id}/files/{path}"} <= set(paths)
    assert set(schema.json()["components"]["schemas"]["JobRequest"]["properties"]) == {"config", "overrides", "base"}


def test_a_second_server_on_the_same_data_folder_is_refused(server):
    proc = subprocess.run([sys.executable, "-m", "gesso.cli", "serve", "--port", "0", "--data", str(server.data)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: --data {server.data}: in use by another gesso serve (pid {server.proc.pid} on ")


def test_a_data_folder_whose_queue_is_not_readable_is_refused_in_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "jobs.db").write_bytes(b"this is not a database " * 100)
    proc = subprocess.run([sys.executable, "-m", "gesso.cli", "serve", "--port", "0", "--data", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: {tmp_path / 'data' / 'jobs.db'}: not a queue this server can read (file is not a database)"]
    assert (tmp_path / "data" / "jobs.db").read_bytes() == b"this is not a database " * 100


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_a_non_local_address_without_a_token_is_refused(host, tmp_path, monkeypatch):
    monkeypatch.delenv("GESSO_SERVE_TOKEN", raising=False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["serve", "--host", host, "--data", str(tmp_path / "data")])
    assert code == 2 and err.getvalue().splitlines() == [
        f"error: --host {host} can be reached from other machines: give --token (or GESSO_SERVE_TOKEN) so that only "
        "clients holding it can train here"]
    assert not (tmp_path / "data").exists()  # refused before anything was written
