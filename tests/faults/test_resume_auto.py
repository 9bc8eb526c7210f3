"""`--resume auto`: the same command, run again after a disconnect, goes on from the output folder's unfinished
run; run again after the run finished, it says so and exits 0 with every file unchanged; a folder holding anything
else is refused as a fresh run is."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults_testutil import DEMO, ROOT, assert_one_line_error, assert_unchanged, gesso_main, snapshot
from safetensors.torch import save_file

from gesso.engine.config.load import load_config
from gesso.engine.loop.train import train
from gesso.engine.lora.files import read_lora

# 12 images x 2 repeats / batch 4 at 64 px = 6 steps per epoch, 2 epochs; a state every step
SETS = ["train.epochs=2", "dataset.repeats=2", "dataset.resolution=64", "sample.prompts=[]", "output.tensorboard=false",
        "output.save_dtype='fp32'", "output.save_every_n_steps=1", "output.keep_last=1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def command(folder: Path, cache: Path, *extra: str) -> list[str]:
    """The one command a notebook cell holds."""
    return ["train", str(DEMO), "--output-dir", str(folder), "--resume", "auto",
            *[a for s in [*SETS, f"dataset.cache_dir='{cache}'"] for a in ("--set", s)], *extra]


def rows(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_the_same_command_three_times_interrupted_resumed_and_finished(tmp_path, cache):
    reference = train(load_config(DEMO, [*SETS, f"dataset.cache_dir='{cache}'"]), tmp_path / "reference", progress=False)
    run = tmp_path / "run"

    # 1. a new folder: the run starts; the notebook is cut off (SIGTERM, as a cloud pre-emption) after two steps
    with open(tmp_path / "out", "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *command(run, cache)], stdout=out,
                                stderr=subprocess.STDOUT, env=ENV)
    deadline = time.monotonic() + 300
    while rows(run) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out").read_text()[-3000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, (tmp_path / "out").read_text()[-3000:]
    assert (run / "state.pt").is_file() and not (run / "demo.safetensors").exists()

    # 2. the same command: it goes on from the state and ends with the uninterrupted run's file
    resumed = gesso_main(*command(run, cache))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch" in resumed.stdout
    a, b = read_lora(reference.final)[0], read_lora(run / "demo.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # 3. the same command once more: finished, nothing to do, nothing touched
    before = snapshot(run)
    again = gesso_main(*command(run, cache))
    assert again.returncode == 0 and "this run has finished; nothing to do" in again.stdout, again.stdout + again.stderr
    assert "error" not in again.stderr
    assert_unchanged(before)
    assert snapshot(run).keys() == before.keys()


def test_a_folder_with_another_runs_files_and_no_state_is_refused(tmp_path, cache):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "epoch": 1, "loss": 0.5, "lr": 0.001}\n')  # a run that saved no state
    save_file({"w": torch.ones(2)}, run / "demo-000001.safetensors")  # an epoch file that must not be replaced
    before = snapshot(run)
    proc = gesso_main(*command(run, cache))
    line = assert_one_line_error(proc, run, "--overwrite", "--output-dir")
    assert "--resume" not in line  # there is nothing to go on from
    assert_unchanged(before)


def test_auto_with_overwrite_is_refused_before_anything_is_touched(tmp_path, cache):
    proc = gesso_main(*command(tmp_path / "run", cache, "--overwrite"))
    assert_one_line_error(proc, "--resume auto", "--overwrite")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_unfinished_state_of_another_network_is_refused(tmp_path, cache):
    run = tmp_path / "run"
    train(load_config(DEMO, [*SETS, f"dataset.cache_dir='{cache}'", "train.epochs=1", "output.save_every_n_steps=0"]),
          run, progress=False)
    (run / "demo.safetensors").unlink()  # as if killed after its last state: unfinished
    before = snapshot(run)
    proc = gesso_main(*command(run, cache, "--set", "network.rank=4"))
    assert_one_line_error(proc, run, "of another config (network.rank, train.epochs differ)", "--overwrite")
    assert_unchanged(before)
    # a folder from before manifests: the state itself is checked, and refused for its network
    (run / "gesso-run.json").unlink()
    before = snapshot(run)
    proc = gesso_main(*command(run, cache, "--set", "network.rank=4"))
    assert_one_line_error(proc, "state was trained with network")
    assert_unchanged(before)
