"""Data-parallel training: two processes under torchrun (gloo on the CPU) train as one process with the same
effective batch, write one set of files, and a run killed under two processes resumes, under two or under one,
to the file of the uninterrupted run."""
import contextlib
import dataclasses
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

from gesso.engine.config.load import load_config
from gesso.engine.data.dataset import shard
from gesso.engine.loop.distributed import World, from_environment
from gesso.engine.loop.train import train
from gesso.engine.lora.files import read_lora
from gesso.engine.run.saving import batch_shape, check_resumable
from gesso.engine.run.state import load_state
from gesso.errors import TrainError

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "tests" / "data" / "demo.toml"
# 12 images x 1 repeat / batch 4 at 64 px = 3 batches per epoch, 2 epochs. Two processes take 2 batches a step: 2
# steps per epoch, the second with one batch, so rank 1 has none there (the uneven case). A LoRA file every step.
SETS = ["train.epochs=2", "dataset.repeats=1", "dataset.resolution=64", "sample.prompts=[]", "output.tensorboard=false",
        "output.save_dtype='fp32'", "output.save_every_n_steps=1",
        "train.device='cpu'"]  # gloo on the CPU: on a machine with one GPU, two processes would both ask for it
STEPS = 4
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def sets(cache: Path, accumulation: int) -> list[str]:
    return [*SETS, f"dataset.cache_dir='{cache}'", f"train.gradient_accumulation_steps={accumulation}"]


def torchrun(folder: Path, cache: Path, log: Path, *extra, wait: bool = True):
    """`torchrun --standalone --nproc_per_node 2 -m gesso.cli train ...` (a free port each time), in its own session;
    output in `log`. torchrun starts each worker in a session of its own, so a kill must name them (`kill_tree`)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gesso.cli",
            "train", str(DEMO), "--output-dir", str(folder), *[a for s in sets(cache, 1) for a in ("--set", s)], *map(str, extra)]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=log.parent, start_new_session=True)
    if wait:
        code = proc.wait(timeout=600)
        assert code == 0 and "Traceback" not in log.read_text(), log.read_text()[-4000:]
    return proc


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # dead, not reaped yet
    except OSError:
        return True


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers, as a crash or a lost machine would, and return once none of them runs.

    Killing torchrun's process group alone leaves the workers running in their own sessions (torch's elastic agent
    starts them with start_new_session), still writing the run's files while the test copies them."""
    workers = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while not all(gone(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} still run after SIGKILL"
        time.sleep(0.01)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in a)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache) -> Path:
    """One process, batch 4 x accumulation 2: the effective batch of two processes at batch 4 (fills the cache)."""
    out = tmp_path_factory.mktemp("single")
    train(load_config(DEMO, sets(cache, 2)), out, progress=False)
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    """Two processes, batch 4, on a fresh cache of their own: rank 0 fills it, rank 1 reads it."""
    base = tmp_path_factory.mktemp("two")
    torchrun(base / "run", base / "cache", base / "log")
    return base


@pytest.mark.slow
def test_two_processes_train_as_one_process_with_the_same_effective_batch(single, two, cache):
    run = two / "run"
    # one set of files: exactly the single-process run's (rank 1 wrote none of its own, and no lock or temp file is left)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in single.iterdir())
    assert len(list(run.glob("demo-step*.safetensors"))) == STEPS - 1  # the last step's file is the final one
    for path in sorted(single.glob("*.safetensors")):  # the LoRA after each step, and the epoch and final files
        assert relative_difference(read_lora(run / path.name)[0], read_lora(path)[0]) <= 1e-6, path.name
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == STEPS  # written once, by rank 0; the loss is the mean over both ranks' batches
    for got, expected in zip(rows, (single / "metrics.jsonl").read_text().splitlines()):
        got, expected = json.loads(got), json.loads(expected)
        assert got["step"] == expected["step"] and abs(got["loss"] - expected["loss"]) <= 1e-6 * expected["loss"]
    # the cache as one process writes it: each file once, in the same names
    assert sorted(p.name for p in (two / "cache").rglob("*.safetensors")) == sorted(p.name for p in cache.rglob("*.safetensors"))
    log = (two / "log").read_text()
    assert "(effective batch 4 x 2 processes x 1 accumulation = 8)" in log
    assert log.count("saved ") == 1  # the other rank prints nothing


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_file(tmp_path, single, two, cache):
    run = tmp_path / "run"
    proc = torchrun(run, cache, tmp_path / "log", wait=False)
    deadline = time.monotonic() + 600
    while not ((run / "state.pt").is_file() and load_state(run)["step"] >= 1):
        assert proc.poll() is None, (tmp_path / "log").read_text()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    kill_tree(proc)  # torchrun and both workers, mid-run
    killed_at = load_state(run)["step"]
    assert killed_at < STEPS and not (run / "demo.safetensors").exists(), "the run ended before the kill"
    one = tmp_path / "one"
    shutil.copytree(run, one)

    torchrun(run, cache, tmp_path / "resumed", "--resume", run)
    assert torch.equal(*(torch.cat([t.flatten() for _, t in sorted(read_lora(p)[0].items())])
                         for p in (run / "demo.safetensors", two / "run" / "demo.safetensors")))
    # the same state goes on in one process with accumulation 2: the effective batch is kept
    resumed = train(load_config(DEMO, sets(cache, 2)), one, resume=one, progress=False)
    assert relative_difference(read_lora(resumed.final)[0], read_lora(two / "run" / "demo.safetensors")[0]) <= 1e-6
    assert "resuming at epoch" in (tmp_path / "resumed").read_text() and killed_at >= 1


@pytest.mark.slow
def test_a_state_resumes_only_with_the_same_effective_batch(single, cache):
    state = load_state(single)
    assert state["batch_shape"] == {"batch_size": 4, "batches_per_step": 2}
    cfg = load_config(DEMO, sets(cache, 1))
    check_resumable(state, cfg, 2, single)  # 2 processes x accumulation 1
    with pytest.raises(TrainError, match=r"batch_size 4 and 2 batches per step .* batch_size 4 and 1 \(1 process"):
        check_resumable(state, cfg, 1, single)
    wider = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=8))
    with pytest.raises(TrainError, match="keep the effective batch"):
        check_resumable(state, wider, 2, single)
    assert batch_shape(cfg, 3) == {"batch_size": 4, "batches_per_step": 3}


@pytest.mark.parametrize("count, size", [(5, 2), (6, 3), (1, 2)])  # uneven, even, fewer batches than ranks
def test_shard_gives_every_rank_whole_batches_in_their_places(count, size):
    batches = [[(j, k) for k in range(1 + j % 2)] for j in range(count)]
    shards = [shard(batches, r, size) for r in range(size)]
    assert all(len(s) == count for s in shards)  # the same positions on every rank: the same steps
    for j in range(count):
        owners = [r for r in range(size) if shards[r][j] is not None]
        assert owners == [j % size] and shards[j % size][j] is batches[j]


def test_the_world_comes_from_torchruns_environment():
    assert from_environment({}) == World()
    assert from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == World(1, 2, 1)
    with pytest.raises(TrainError, match="RANK"):
        from_environment({"WORLD_SIZE": "2"})
    with pytest.raises(TrainError, match="RANK=2 is not within WORLD_SIZE=2"):
        from_environment({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
