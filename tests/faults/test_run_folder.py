"""Run folders: a new run never replaces an earlier run's files unasked, one run at a time holds a folder, and
the lock and temporary files a killed run leaves are cleaned up by the next run, each with a notice."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults_testutil import DEMO, ROOT, assert_one_line_error, assert_unchanged, gesso_cli, snapshot, temp_litter

from gesso.engine.config.load import load_config
from gesso.engine.loop.train import train
from gesso.engine.lora.files import read_lora
from gesso.engine.run.events import StopTraining
from gesso.errors import TrainError

# 12 images x 1 repeat / batch 4 = 3 steps at 64 px: the smallest run that writes every kind of file
SMALL = ["train.epochs=1", "dataset.repeats=1", "dataset.resolution=64", "sample.prompts=[]", "output.tensorboard=false",
         "output.save_dtype='fp32'"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # filled by the first run, shared by the others: their start-up is short


def train_args(folder: Path, cache: Path, *sets: str) -> list:
    return ["train", DEMO, "--output-dir", folder, *[a for s in [*SMALL, f"dataset.cache_dir='{cache}'", *sets] for a in ("--set", s)]]


def start_run(folder: Path, cache: Path, log: Path, *sets: str) -> subprocess.Popen:
    """`python cli.py train` in the background, its output in `log` (a pipe could fill up and stall it)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, train_args(folder, cache, *sets))],
                                stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for_lock(folder: Path, proc: subprocess.Popen) -> str:
    """The lock file's text once `proc` holds the folder (it writes its pid there right after taking the lock)."""
    lock = folder / ".gesso.lock"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        text = lock.read_text() if lock.exists() else ""
        if f"pid {proc.pid} " in text:
            return text
        time.sleep(0.01)
    raise AssertionError(f"run {proc.pid} never held {folder} (exit {proc.poll()})")


def same_tensors(a: Path, b: Path) -> bool:
    x, y = read_lora(a)[0], read_lora(b)[0]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_a_finished_runs_folder_is_refused_untouched_and_overwrite_replaces_it(tmp_path, cache):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("my settings for this LoRA")  # a user's own file does not make a run
    assert gesso_cli(*train_args(run, cache)).returncode == 0
    first = tmp_path / "first.safetensors"
    first.write_bytes((run / "demo.safetensors").read_bytes())
    before = snapshot(run)
    assert {p.name for p in before} >= {"demo.safetensors", "demo-000001.safetensors", "state.pt", "metrics.jsonl", "notes.txt"}

    again = gesso_cli(*train_args(run, cache))
    line = assert_one_line_error(again, run, "--overwrite", "--output-dir", "demo.safetensors")
    assert "--resume" not in line  # a finished run has nothing to resume
    assert_unchanged(before)
    assert snapshot(run).keys() == before.keys()  # nothing added either: no lock file, no log

    over = gesso_cli(*train_args(run, cache), "--overwrite")
    assert over.returncode == 0, over.stderr[-2000:]
    assert same_tensors(run / "demo.safetensors", first)  # the same config trains the same file again
    assert (run / "notes.txt").read_text() == "my settings for this LoRA"
    assert not (run / ".gesso.lock").exists()


@pytest.mark.slow
def test_resuming_into_another_runs_folder_is_refused(tmp_path, cache):
    # --resume A --output-dir B would replace B's files with A's continuation
    cut, other = tmp_path / "cut", tmp_path / "other"
    assert gesso_cli(*train_args(other, cache)).returncode == 0
    cfg = load_config(DEMO, [*SMALL, f"dataset.cache_dir='{cache}'"])

    def stop(event):
        if event["event"] == "step":
            raise StopTraining

    assert train(cfg, cut, on_event=stop, progress=False).stopped_early
    assert not (cut / ".gesso.lock").exists()  # a host's stop releases the folder too
    before = snapshot(other)
    proc = gesso_cli("train", DEMO, "--resume", cut, "--output-dir", other, *[a for s in [*SMALL, f"dataset.cache_dir='{cache}'"] for a in ("--set", s)])
    assert_one_line_error(proc, other, "--overwrite")
    assert_unchanged(before)
    # the interrupted run's own folder: a fresh run is refused with --resume named, resume=... goes on
    with pytest.raises(TrainError, match=re.escape(f"--resume {cut}")):
        train(cfg, cut, progress=False)
    assert train(cfg, cut, resume=cut, progress=False).final.is_file()


@pytest.mark.slow
def test_a_second_run_in_a_busy_folder_is_refused_naming_the_first_ones_pid(tmp_path, cache):
    run = tmp_path / "run"
    first = start_run(run, cache, tmp_path / "first.log", "train.epochs=500")  # runs until stopped below
    try:
        holder = wait_for_lock(run, first)
        second = gesso_cli(*train_args(run, cache))
        assert_one_line_error(second, run, f"pid {first.pid}", "in use")
        assert first.poll() is None, "the refused run disturbed the first one"
        assert (run / ".gesso.lock").read_text() == holder
    finally:
        first.send_signal(signal.SIGTERM)  # stops at a step boundary with its state saved
        code = first.wait(timeout=300)
    assert code == 143, (tmp_path / "first.log").read_text()[-2000:]
    assert not (run / ".gesso.lock").exists()  # released on the way out
    assert (run / "state.pt").is_file()


@pytest.mark.slow
def test_a_killed_runs_stale_lock_and_temp_files_are_cleaned_by_the_next_run(tmp_path, cache):
    run = tmp_path / "run"
    killed = start_run(run, cache, tmp_path / "killed.log", "train.epochs=500")
    wait_for_lock(run, killed)
    killed.kill()
    killed.wait(timeout=60)
    assert f"pid {killed.pid} " in (run / ".gesso.lock").read_text()  # the kernel dropped its lock, the file stays
    left = len(temp_litter(run))  # none unless the kill landed in a write
    # what write_atomic leaves when killed mid-write, in the folder and samples/; and files that are not its own
    ours = [run / ".demo-step00000004.safetensors.k2x_9qaz.tmp", run / ".state.pt.abcdefgh.tmp",
            run / "samples" / ".demo-e000001-00.png.0a1b2c3d.tmp"]
    theirs = [run / "notes.tmp", run / ".notes.tmp", run / "sub" / ".x.safetensors.abcdefgh.tmp"]
    for p in ours + theirs:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"partial")
    before = {p: p.read_bytes() for p in theirs}

    proc = gesso_cli(*train_args(run, cache), "--overwrite")  # the killed run may have left metrics.jsonl
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    notices = [line for line in proc.stderr.splitlines() if line.startswith("notice: ")]
    assert len(notices) == 2, proc.stderr[-2000:]
    assert "taking over the lock" in notices[0] and f"pid {killed.pid} " in notices[0] and str(run) in notices[0]
    assert f"removed {3 + left} temporary file(s)" in notices[1] and str(run) in notices[1]
    assert not any(p.exists() for p in ours)
    assert sorted(temp_litter(run)) == sorted(p for p in theirs if p.suffix == ".tmp")
    assert_unchanged(before)
    assert not (run / ".gesso.lock").exists()
