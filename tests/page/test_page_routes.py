"""The page's routes in-process (no browser, no job runs): its files with their Content-Security-Policy and nothing
else under /static, public with a token while the API is not, the demo config, a submission's plan, and a grid
request checked against the run's files, each refusal one JSON line naming its field."""
import json
import sqlite3

import pytest
from fastapi.testclient import TestClient
from page_testutil import DEMO_DIR

from gesso.serve.app import create_app
from gesso.serve.page import STATIC
from gesso.serve.runner import Runner
from gesso.serve.store import Store

DEMO = DEMO_DIR / "demo.toml"


def client(tmp_path, token=None, demo=DEMO) -> tuple[TestClient, Store]:
    tmp_path.mkdir(exist_ok=True)
    store = Store(tmp_path / "jobs.db")
    app = create_app(store, Runner(store, tmp_path, ["cpu"]), tmp_path, token, demo)
    return TestClient(app), store  # not entered: no lifespan, so the runner starts no job


def test_the_page_and_its_files_carry_the_policy_and_nothing_else_is_served_under_static(tmp_path):
    c, _ = client(tmp_path)
    page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'; connect-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/static/app.js">' in page.text
    script = c.get("/static/app.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8" and script.text == (STATIC / "app.js").read_text()
    assert c.get("/static/vendor/uPlot.LICENSE.txt").text.startswith("The MIT License")
    for path in ("/static/../page.py", "/static/%2e%2e/page.py", "/static/vendor", "/static/nothing.js"):
        r = c.get(path)
        assert r.status_code == 404 and "error" in r.json(), path  # a JSON line, never a file from elsewhere


def test_with_a_token_the_page_is_public_and_the_api_is_not(tmp_path):
    c, _ = client(tmp_path, token="s3cret")
    assert c.get("/").status_code == 200 and c.get("/static/api.js").status_code == 200
    assert c.get("/jobs").status_code == 401 and c.get("/demo").status_code == 401
    assert c.get("/jobs", headers={"Authorization": "Bearer s3cret"}).json() == {"jobs": []}


def test_the_demo_route_gives_the_servers_demo_or_says_how_to_have_one(tmp_path):
    c, _ = client(tmp_path)
    assert c.get("/demo").json() == {"config": DEMO.read_text(), "base": str(DEMO_DIR), "file": str(DEMO)}
    none, _ = client(tmp_path / "other", demo=None)
    r = none.get("/demo")
    assert r.status_code == 404 and r.json()["key"] == "demo" and "--demo FILE.toml" in r.json()["error"]


@pytest.mark.slow  # the step on the meta device: 10 to 30 s on a loaded 2-core machine
def test_the_plan_gives_the_steps_line_and_the_memory_prediction_or_the_error_naming_the_key(tmp_path):
    c, store = client(tmp_path)
    body = {"config": DEMO.read_text(), "base": str(DEMO_DIR), "overrides": ["train.epochs=3", "dataset.resolution=64"]}
    plan = c.post("/jobs/plan", json=body).json()
    assert plan["steps"] == "12 images x 10 repeats = 120 samples / batch 4 = 30 steps per epoch x 3 epochs = 90 steps"
    assert plan["total_steps"] == 90 and plan["memory"].startswith("tiny-sdxl 64px batch 4 rank 8, fp32, adamw: peak ")
    assert plan["peak_gib"] > 0 and "meta device" in plan["note"]
    bad = c.post("/jobs/plan", json={**body, "overrides": ["network.rank=0"]})
    assert bad.status_code == 422 and bad.json()["key"] == "network.rank"
    (tmp_path / "empty").mkdir()
    empty = c.post("/jobs/plan", json={**body, "overrides": [f"dataset.path='{tmp_path / 'empty'}'"]})
    assert empty.status_code == 422 and empty.json()["key"] == "dataset.path" and "no trainable images" in empty.json()["error"]
    assert store.jobs() == []  # a plan queues nothing


def test_a_grid_request_is_checked_against_the_runs_epoch_files(tmp_path):
    c, store = client(tmp_path)
    job = c.post("/jobs", json={"config": DEMO.read_text(), "base": str(DEMO_DIR)}).json()
    none = c.post(f"/jobs/{job['id']}/grid", json={})
    assert none.status_code == 409 and none.json()["key"] == "epochs" and "no epoch files" in none.json()["error"]
    out = tmp_path / "jobs" / str(job["id"])
    out.mkdir(parents=True)
    for name in ("demo-000001.safetensors", "demo-000003.safetensors", "demo.safetensors", "demo-step00000005.safetensors"):
        (out / name).write_bytes(b"")  # only the names count here
    refusals = {"epochs": {"epochs": [2]}, "strengths": {"strengths": [0.5, 0.5]}, "prompt": {"prompt": "x <lora:other:1>"},
                "sampler": {"sampler": "plms"}, "steps": {"steps": 0}}
    for key, body in refusals.items():
        r = c.post(f"/jobs/{job['id']}/grid", json=body)
        assert r.status_code == 422 and r.json()["key"] == key, (key, r.json())
    grid = c.post(f"/jobs/{job['id']}/grid", json={"seed": 7}).json()
    assert (grid["kind"], grid["status"], grid["name"]) == ("grid", "queued", "demo grid")
    config = store.job(grid["id"])["config"]
    assert config["epochs"] == ["demo-000001", "demo-000003"] and config["strengths"] == [0.25, 0.5, 0.75, 1.0]
    assert config["prompt"] == "gssdemo, a red circle on a blue background" and config["seed"] == 7 and config["lora_dir"] == str(out)
    again = c.post(f"/jobs/{grid['id']}/grid", json={})
    assert again.status_code == 422 and again.json()["key"] == "id"  # a grid of a grid
    assert c.post(f"/jobs/{grid['id']}/save-now").status_code == 409  # queued; and a running grid takes stop alone


def test_a_queue_of_schema_1_is_upgraded_in_place_its_jobs_kept_as_training_jobs(tmp_path):
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        db.executescript("""CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, status TEXT NOT NULL,
            config TEXT NOT NULL, request TEXT NOT NULL, notices TEXT NOT NULL, output_dir TEXT NOT NULL, created_at REAL NOT NULL,
            started_at REAL, ended_at REAL, device TEXT, pid INTEGER, stop_requested INTEGER NOT NULL DEFAULT 0, error TEXT,
            live TEXT NOT NULL DEFAULT '{}');
            CREATE TABLE events (job INTEGER NOT NULL REFERENCES jobs(id), seq INTEGER NOT NULL, data TEXT NOT NULL, UNIQUE (job, seq));
            INSERT INTO jobs (name, status, config, request, notices, output_dir, created_at) VALUES ('old', 'stopped', '{}', '{}', '[]', '/x', 1);
            PRAGMA user_version = 1;""")
    store = Store(tmp_path / "jobs.db")
    assert store.job(1)["kind"] == "train" and store.job(1)["name"] == "old"
    assert store.submit("g", {}, {}, [], tmp_path, kind="grid")["kind"] == "grid"
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert json.loads(json.dumps(store.jobs()))[0]["id"] == 1
