"""A run folder knows which run it holds (gesso-run.json): the same run, killed before its first state.pt, starts
again from its own files on the same command, while another config is refused naming what differs; and
`--overwrite` removes nothing until the new run writes its first file, so a failed or killed overwrite leaves the
earlier run whole and resumable."""
import json
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
from gesso.engine.run import rundir
from gesso.engine.run.events import StopTraining
from gesso.engine.run.state import load_state

# 12 images x 2 repeats / batch 4 at 64 px = 6 steps, a LoRA file every step
SMALL = ["train.epochs=1", "dataset.repeats=2", "dataset.resolution=64", "sample.prompts=[]", "output.save_dtype='fp32'",
         "output.save_every_n_steps=1"]
# 30 steps and no file before the epoch's end: an overwrite that is stopped mid-epoch has written nothing yet
LONG = ["dataset.repeats=10", "output.save_every_n_steps=0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    """The uninterrupted run's folder."""
    folder = tmp_path_factory.mktemp("reference") / "run"
    train(load_config(DEMO, [*SMALL, f"dataset.cache_dir='{cache}'"]), folder, progress=False)
    return folder


def args(folder: Path, cache: Path, *sets: str) -> list:
    return ["train", DEMO, "--output-dir", folder, *[a for s in [*SMALL, f"dataset.cache_dir='{cache}'", *sets] for a in ("--set", s)]]


def start(folder: Path, cache: Path, log: Path, *extra) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, args(folder, cache)), *map(str, extra)],
                                stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def kill_when(proc: subprocess.Popen, condition, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.002)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL, log.read_text()[-3000:]


def same_lora(a: Path, b: Path) -> bool:
    x, y = read_lora(a)[0], read_lora(b)[0]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def kept(folder: Path) -> dict[Path, bytes]:
    """The folder's files but the lock a killed run leaves (the next run takes it over and removes it)."""
    return {p: b for p, b in snapshot(folder).items() if p.name != ".gesso.lock"}


@pytest.fixture(scope="module")
def killed_start(tmp_path_factory, cache, reference) -> Path:
    """The folder of a run killed (kill -9) after two step files and before any state.pt (its states are off)."""
    root = tmp_path_factory.mktemp("killed")
    run = root / "run"
    proc = start(run, cache, root / "log", "--set", "output.save_state=false")
    kill_when(proc, lambda: (run / "demo-step00000002.safetensors").is_file(), root / "log")
    assert not (run / "state.pt").exists() and (run / "gesso-run.json").is_file()
    return run


@pytest.mark.slow  # the killed start: a run in its own process
@pytest.mark.parametrize("resume", [["--resume", "auto"], []], ids=["resume-auto", "plain"])
def test_the_same_run_killed_before_its_first_state_starts_again(tmp_path, cache, reference, killed_start, resume):
    run = tmp_path / "run"
    shutil.copytree(killed_start, run)
    proc = gesso_main(*args(run, cache), *resume)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notices = [line for line in proc.stderr.splitlines() if "starting it again from step 0" in line]
    assert len(notices) == 1 and str(run) in notices[0] and "files kept" in notices[0], proc.stderr[-2000:]
    assert same_lora(run / "demo.safetensors", reference / "demo.safetensors")
    assert sorted(p.name for p in run.glob("*.safetensors")) == sorted(p.name for p in reference.glob("*.safetensors"))
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_another_config_in_a_killed_runs_folder_is_refused_naming_what_differs(tmp_path, cache, killed_start):
    run = tmp_path / "run"
    shutil.copytree(killed_start, run)
    before = kept(run)
    proc = gesso_main(*args(run, cache, "train.learning_rate=0.001", "network.rank=4"), "--resume", "auto")
    line = assert_one_line_error(proc, run, "of another config (network.rank, train.learning_rate differ)", "--overwrite")
    assert "--resume" not in line  # there is no state to go on from
    assert_unchanged(before)
    assert kept(run).keys() == before.keys()


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory, cache) -> Path:
    """An earlier run stopped by its host after two steps: two step files, state.pt at step 2, its manifest."""
    folder = tmp_path_factory.mktemp("unfinished") / "run"

    def stop(event):
        if event["event"] == "step" and event["step"] == 2:
            raise StopTraining

    assert train(load_config(DEMO, [*SMALL, f"dataset.cache_dir='{cache}'"]), folder, on_event=stop, progress=False).stopped_early
    return folder


def assert_resumable_to(run: Path, cache: Path, reference: Path) -> None:
    assert rundir.assess(run, load_config(DEMO, [*SMALL, f"dataset.cache_dir='{cache}'"]))[0] == rundir.UNFINISHED
    proc = gesso_main(*args(run, cache), "--resume", "auto")
    assert proc.returncode == 0 and "resuming at epoch 1, step 2 of 6" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert same_lora(run / "demo.safetensors", reference / "demo.safetensors")


@pytest.mark.slow
def test_an_overwrite_that_fails_before_its_first_file_leaves_the_earlier_run_whole(tmp_path, cache, reference, unfinished):
    run = tmp_path / "run"
    shutil.copytree(unfinished, run)
    before = snapshot(run)
    # a rate that makes the loss NaN within the epoch, before its first file
    proc = gesso_main(*args(run, cache, *LONG, "train.learning_rate=1e6", "train.max_grad_norm=0"), "--overwrite")
    assert_one_line_error(proc, "loss is nan")
    assert_unchanged(before)
    assert snapshot(run).keys() == before.keys()
    assert_resumable_to(run, cache, reference)


@pytest.mark.slow
def test_an_overwrite_killed_before_its_first_file_leaves_the_earlier_run_resumable(tmp_path, cache, reference, unfinished):
    run = tmp_path / "run"
    shutil.copytree(unfinished, run)
    before = snapshot(run)
    proc = start(run, cache, tmp_path / "log", *[a for s in LONG for a in ("--set", s)], "--overwrite")
    kill_when(proc, lambda: "loss=" in (tmp_path / "log").read_text(), tmp_path / "log")  # training, step 1 done
    assert_unchanged(before)
    assert kept(run).keys() == before.keys()  # the lock aside, nothing written: no log row, no manifest
    assert_resumable_to(run, cache, reference)


@pytest.mark.slow
def test_an_overwrite_replaces_the_earlier_run_at_its_first_file(tmp_path, cache, unfinished):
    run = tmp_path / "run"
    shutil.copytree(unfinished, run)
    (run / "notes.txt").write_text("mine")
    earlier = load_state(run)
    proc = gesso_main(*args(run, cache, "train.learning_rate=0.001", "output.save_every_n_steps=0"), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == [
        "demo-000001.safetensors", "demo.safetensors", "gesso-run.json", "metrics.jsonl", "notes.txt", "state.pt"]
    assert load_state(run)["step"] == 6 and earlier["step"] == 2
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "gesso-run.json").read_text())["config"]["train.learning_rate"] == 0.001
    assert len(list((run / "tensorboard").glob("events.*"))) == 1  # the earlier run's are gone with it
