"""kill -9 (the OOM killer, a notebook that disconnects) at 20 random points of a run that saves a LoRA file and a
state every step, each followed by the same command with `--resume auto`, as a notebook cell is re-run: every
restart goes on, every complete file stays loadable, and the final LoRA is the uninterrupted run's, tensor for
tensor. The kill points are drawn by a seeded RNG over start-up, caching, the steps and the saves, and one lands
after the run's first step file and before its first state.pt, the folder that `--resume auto` used to refuse.
A different config in the folder is refused all along."""
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from faults_testutil import DEMO, Zygote, loadable, snapshot, temp_litter

from gesso.engine.config.load import load_config
from gesso.engine.loop.train import train
from gesso.engine.lora.files import read_lora

# 12 images x 2 repeats / batch 4 at 64 px = 6 steps per epoch, 3 epochs: 18 steps, a LoRA file and a state each
SETS = ["train.epochs=3", "dataset.repeats=2", "dataset.resolution=64", "sample.prompts=[]", "output.tensorboard=false",
        "output.save_dtype='fp32'", "output.save_every_n_steps=1", "output.keep_last=2"]
STEPS = 18
KILLS = 20
EARLY = 7  # the first kills fall in start-up and caching (an empty cache); the later ones in start-up, steps and saves


def command(run: Path, cache: Path, *sets: str) -> list[str]:
    """The one command the notebook cell holds."""
    return ["train", str(DEMO), "--output-dir", str(run), "--resume", "auto",
            *[a for s in [*SETS, f"dataset.cache_dir='{cache}'", *sets] for a in ("--set", s)]]


def rows(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def cached(cache: Path) -> int:
    return sum(1 for p in cache.rglob("*.safetensors") if p.is_file())


class Run:
    """One launch of the command in the zygote, and the moments to kill it at."""

    def __init__(self, zygote: Zygote, pid: int, folder: Path):
        self.zygote, self.pid, self.folder = zygote, pid, folder

    def until(self, condition) -> None:
        """Poll `condition` every 2 ms while the run lives, and kill no later than its last step: the run must not
        finish before the 20th kill, however fast the machine (a run that ends first fails the test)."""
        deadline = time.monotonic() + 300
        while not condition() and rows(self.folder) < STEPS - 1 and self.zygote.poll(self.pid) is None:
            assert time.monotonic() < deadline, "no kill point within 300 s"
            time.sleep(0.002)

    def kill(self) -> int:
        if self.zygote.poll(self.pid) is None:  # not reaped, so the pid is still the child's (a zombie at worst)
            os.kill(self.pid, signal.SIGKILL)
        return self.zygote.wait(self.pid)


def wait_for_point(point: str, run: Run, cache: Path, rng: random.Random) -> None:
    folder = run.folder
    if point == "start-up":  # config, model, dataset scan, the lock, the state: before any step
        until = time.monotonic() + rng.uniform(0.0, 1.5)
        run.until(lambda: time.monotonic() >= until)
    elif point == "caching":  # between cache files being written
        target = cached(cache) + rng.randint(1, 4)
        run.until(lambda: cached(cache) >= target or rows(folder) > 0)
    elif point == "first step file":  # the step's LoRA file written, its state.pt not yet
        run.until(lambda: any(folder.glob("demo-step*.safetensors")))
    elif point == "step":  # inside the next step's compute
        target = rows(folder) + 1
        run.until(lambda: rows(folder) >= target)
        until = time.monotonic() + rng.uniform(0.0, 0.3)
        run.until(lambda: time.monotonic() >= until)
    else:  # "save": as a write is under way (its temporary file there), or just after state.pt was replaced
        seen = _version(folder / "state.pt")
        run.until(lambda: any(folder.glob(".*.tmp")) or _version(folder / "state.pt") != seen)


def _version(path: Path):
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns
    except FileNotFoundError:
        return None


def plan(rng: random.Random) -> list[str]:
    early = [rng.choice(["start-up", "caching", "caching"]) for _ in range(EARLY)]
    late = [rng.choice(["start-up", "step", "step", "save", "save"]) for _ in range(KILLS - EARLY - 1)]
    return early + ["first step file"] + late


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_auto_ends_with_the_uninterrupted_lora(tmp_path):
    reference = read_lora(train(load_config(DEMO, [*SETS, f"dataset.cache_dir='{tmp_path / 'ref-cache'}'"]),
                                tmp_path / "reference", progress=False).final)[0]
    folder, cache, rng = tmp_path / "run", tmp_path / "cache", random.Random(2027)
    zygote = Zygote(tmp_path, DEMO, SETS)
    points, restarted, refused = plan(rng), 0, False
    try:
        for i, point in enumerate(points):
            run = Run(zygote, zygote.run(command(folder, cache), tmp_path / f"log{i}"), folder)
            wait_for_point(point, run, cache, rng)
            code = run.kill()
            log = (tmp_path / f"log{i}").read_text() if (tmp_path / f"log{i}").exists() else ""  # killed before it opened
            assert code == -signal.SIGKILL, f"kill {i} ({point}): the run ended by itself (exit {code}): {log[-3000:]}"
            assert "Traceback" not in log and "error: " not in log, log[-3000:]
            restarted += "starting it again from step 0" in log
            for p in snapshot(folder):  # every complete file the kill left: LoRA files, state.pt, metrics.jsonl
                if not p.name.endswith(".tmp") and p.name != ".gesso.lock":
                    loadable(p)
            if not refused and (folder / "gesso-run.json").is_file() and rows(folder):
                refused = True  # another config in the killed run's folder, once it holds the run's files
                before = {p: b for p, b in snapshot(folder).items() if p.name != ".gesso.lock" and not p.name.endswith(".tmp")}
                pid = zygote.run(command(folder, cache, "train.learning_rate=0.001"), tmp_path / "other")
                assert zygote.wait(pid) == 2
                other = (tmp_path / "other").read_text()
                assert "of another config (train.learning_rate differ)" in other and "--overwrite" in other, other[-2000:]
                assert {p: b for p, b in snapshot(folder).items() if p in before} == before
                assert before.keys() <= snapshot(folder).keys()
        code = zygote.wait(zygote.run(command(folder, cache), tmp_path / "last"))
    finally:
        zygote.close()
    log = (tmp_path / "last").read_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    assert refused
    got = read_lora(folder / "demo.safetensors")[0]
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(p.name for p in (tmp_path / "reference").glob("*.safetensors"))
    assert not temp_litter(folder) and not (folder / ".gesso.lock").exists()
    print(f"{KILLS} kills at {points}; {restarted} restart(s) of a run killed before its first state")
