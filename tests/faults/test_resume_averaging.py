"""The state EMA and schedule-free AdamW add to state.pt: a run with either, killed (kill -9) mid-run, resumes to the
uninterrupted run's file; a resume that would change the EMA (on, off, another decay) or swap AdamW and schedule-free
is one error line naming the key, every file left as it was; a forged EMA state is one line naming state.pt."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults_testutil import DEMO, ROOT, assert_one_line_error, assert_unchanged, gesso_main, snapshot

from gesso.engine.config.load import load_config
from gesso.engine.loop.train import train
from gesso.engine.lora.files import read_lora
from gesso.engine.run.state import STATE_FILE, load_state

# 12 images x 2 repeats / batch 4 at 64 px = 6 steps, one epoch; a LoRA file and a state every step
SETS = ["train.epochs=1", "dataset.repeats=2", "dataset.resolution=64", "sample.prompts=[]", "output.tensorboard=false",
        "output.save_dtype='fp32'", "output.save_every_n_steps=1", "output.keep_last=1"]
KINDS = {"adamw": [], "ema": ["train.ema_decay=0.8"], "schedule-free": ["train.optimizer='adamw_schedulefree'"]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache) -> dict[str, Path]:
    """Each kind's uninterrupted run: its folder, with the final LoRA file and the state.pt of its last step."""
    root = tmp_path_factory.mktemp("finished")
    return {kind: train(load_config(DEMO, sets(cache, kind)), root / kind, progress=False).output_dir for kind in KINDS}


def sets(cache: Path, kind: str, *extra: str) -> list[str]:
    return [*SETS, f"dataset.cache_dir='{cache}'", *KINDS[kind], *extra]


def resume(run: Path, cache: Path, kind: str, *extra: str):
    return gesso_main("train", DEMO, "--resume", run, *[a for s in sets(cache, kind, *extra) for a in ("--set", s)])


def copy(folder: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    return run


def metrics_rows(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ema", "schedule-free"])
def test_a_killed_run_resumes_to_the_uninterrupted_file(tmp_path, cache, finished, kind):
    run, log = tmp_path / "run", tmp_path / "log"
    args = ["train", DEMO, "--output-dir", run, *[a for s in sets(cache, kind) for a in ("--set", s)]]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args)], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 300
    while metrics_rows(run) < 2:  # step 1's state.pt is written before step 2's row
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.005)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    state = load_state(run)
    assert 1 <= state["step"] < 6
    if kind == "ema":
        assert state["ema"]["decay"] == 0.8 and len(state["ema"]["shadow"]) == sum(not k.endswith(".alpha") for k in state["lora"])
    else:
        assert state["optimizer"]["state"] and all("z" in s for s in state["optimizer"]["state"].values())
    done = resume(run, cache, kind)
    assert done.returncode == 0 and "resuming at epoch" in done.stdout, done.stderr[-3000:]
    a, b = read_lora(finished[kind] / "demo.safetensors")[0], read_lora(run / "demo.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "differs from the uninterrupted run"


@pytest.mark.parametrize("saved, extra, says", [
    ("ema", ["train.ema_decay=0"], "train.ema_decay = 0.8 (0: off), this run has 0"),      # EMA dropped on resume
    ("adamw", ["train.ema_decay=0.8"], "train.ema_decay = 0.0 (0: off), this run has 0.8"),  # EMA added on resume
    ("ema", ["train.ema_decay=0.9"], "train.ema_decay = 0.8 (0: off), this run has 0.9"),  # another decay
    ("schedule-free", ["train.optimizer='adamw'"], "another optimizer's"),
    ("adamw", ["train.optimizer='adamw_schedulefree'"], "another optimizer's"),
], ids=["ema-off", "ema-on", "ema-other-decay", "schedule-free-to-adamw", "adamw-to-schedule-free"])
@pytest.mark.slow
def test_a_resume_with_other_averaging_is_one_line(tmp_path, cache, finished, saved, extra, says):
    run = copy(finished[saved], tmp_path)
    before = snapshot(run)
    # the saved run's own keys, then the changed one (a later --set wins)
    assert_one_line_error(resume(run, cache, saved, *extra), says)
    assert_unchanged(before)
    assert snapshot(run).keys() == before.keys()


@pytest.mark.parametrize("ema, says", [
    ({"decay": "0.8", "shadow": []}, "'ema' is not an EMA state"),
    ({"decay": 0.8, "shadow": [[1.0]]}, "'ema' is not an EMA state"),
    ({"decay": 1.5, "shadow": []}, "'ema' is not an EMA state"),
    ({"decay": 0.8, "shadow": [torch.randn(3, 5)]}, "EMA weights do not fit this network"),
], ids=["decay-as-text", "shadow-of-lists", "decay-above-1", "shadow-of-another-network"])
@pytest.mark.slow
def test_a_forged_ema_state_is_one_line_naming_it(tmp_path, cache, finished, ema, says):
    run = copy(finished["ema"], tmp_path)
    torch.save({**torch.load(run / STATE_FILE, weights_only=True), "ema": ema}, run / STATE_FILE)
    before = snapshot(run)
    assert_one_line_error(resume(run, cache, "ema"), STATE_FILE, says)
    assert_unchanged(before)
    assert snapshot(run).keys() == before.keys()
