"""Signals: Ctrl-C and SIGTERM stop a run at a step boundary with a resumable state (exit 130 / 143, one line,
no traceback), Ctrl-C during start-up stops it at once, an interrupt inside the optimizer update keeps the last
good state (kill -9 at random points, each followed by --resume auto: tests/faults/test_kill_9.py)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults_testutil import DEMO, ROOT, assert_unchanged, loadable, snapshot, temp_litter

from gesso.engine.config.load import load_config
from gesso.engine.loop import train as train_module
from gesso.engine.loop.train import train
from gesso.engine.lora.files import read_lora
from gesso.engine.run.manifest import MANIFEST_FILE, read_manifest
from gesso.engine.run.state import load_state

# 12 images x 2 repeats / batch 4 at 64 px = 6 steps per epoch, 2 epochs; a LoRA file and a state every step
SETS = ["train.epochs=2", "dataset.repeats=2", "dataset.resolution=64", "sample.prompts=[]", "output.tensorboard=false",
        "output.save_dtype='fp32'", "output.save_every_n_steps=1", "output.keep_last=2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> dict[str, torch.Tensor]:
    """The final LoRA of the run never interrupted (and the run that fills the shared cache); in this process, which
    computes as `python cli.py train` does with one thread."""
    return read_lora(train(config(cache), tmp_path_factory.mktemp("reference"), progress=False).final)[0]


def config(cache: Path):
    return load_config(DEMO, [*SETS, f"dataset.cache_dir='{cache}'"])


def train_args(folder: Path, cache: Path, *extra) -> list[str]:
    return ["train", str(DEMO), "--output-dir", str(folder), *[a for s in [*SETS, f"dataset.cache_dir='{cache}'"] for a in ("--set", s)],
            *map(str, extra)]


def start_run(folder: Path, cache: Path, logs: Path, *extra, python=()) -> subprocess.Popen:
    """`python cli.py train` in the background, stdout and stderr in files (a pipe could fill up and stall it)."""
    logs.mkdir(exist_ok=True)
    with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
        return subprocess.Popen([sys.executable, *python, str(ROOT / "cli.py"), *train_args(folder, cache, *extra)],
                                stdout=out, stderr=err, env=ENV)


def imported(err: Path, name: str) -> bool:
    """Whether the run's stderr shows `name` imported (`python -X importtime` logs a module as its import ends); a
    name ending in a dot: any module under it."""
    lines = err.read_text().split("\n")[:-1]  # the last is empty or still being written
    names = [line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")]
    return any(n == name or name.endswith(".") and n.startswith(name) for n in names)


def wait_until(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after 300 s"
        time.sleep(0.005)


def rows(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def assert_one_interrupted_line(logs: Path, code: int, proc_code: int) -> str:
    out, err = (logs / "out").read_text(), (logs / "err").read_text()
    assert "Traceback" not in out + err and "Exception ignored" not in err, (out + err)[-3000:]
    assert proc_code == code, f"exit {proc_code}, expected {code}: {(out + err)[-2000:]}"
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]  # splitlines: tqdm's \r too
    assert len(lines) == 1, err[-2000:]
    assert not [line for line in err.splitlines() if line.startswith("error: ")], err[-2000:]
    return lines[0]


def assert_same_as(reference: dict[str, torch.Tensor], path: Path) -> None:
    got = read_lora(path)[0]
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got), "differs from the uninterrupted run"


@pytest.mark.slow
@pytest.mark.parametrize("signals, code", [
    ([signal.SIGINT], 130),                                # Ctrl-C: the step finishes, its state is saved
    ([signal.SIGINT, signal.SIGINT], 130),                 # twice, quickly: stop now, the last finished step saved
    ([signal.SIGINT, signal.SIGINT, signal.SIGINT], 130),  # three times: the third is noted, or abandons a save
    ([signal.SIGTERM], 143),                               # a scheduler or a cloud pre-emption: as Ctrl-C
], ids=["sigint", "sigint-twice", "sigint-thrice", "sigterm"])
def test_a_signal_in_the_loop_leaves_a_state_that_resumes_to_the_uninterrupted_file(tmp_path, cache, reference, signals, code):
    run, logs = tmp_path / "run", tmp_path / "logs"
    proc = start_run(run, cache, logs)
    wait_until(lambda: rows(run) >= 2, proc, "two steps")  # step 1's state.pt is written before step 2's row
    for i, s in enumerate(signals):
        if i:
            time.sleep(0.05)
        proc.send_signal(s)
    line = assert_one_interrupted_line(logs, code, proc.wait(timeout=300))
    assert signal.Signals(signals[-1]).name in line
    state = load_state(run)
    if len(signals) == 1:  # saved at the step boundary after the signal, and the line says which
        assert f"at step {state['step']}:" in line and state["step"] >= 2 and f"--resume {run}" in line
    assert not (run / ".gesso.lock").exists() and not temp_litter(run)
    saved = list(run.glob("*.safetensors"))
    assert saved, "two steps trained and no LoRA file left"  # a file every step: an empty loop would check nothing
    for p in saved:
        loadable(p)

    # the state goes on in this process (the CLI's --resume is this call; the kill test below runs it)
    resumed = train(config(cache), run, resume=run, progress=False)
    assert_same_as(reference, resumed.final)


# while Python loads torch (an interrupted extension module's import raises ImportError, not KeyboardInterrupt), then
# the engine once torch is in; just after the run took its folder (building the model); encoding the dataset into an
# empty cache. The fast subset keeps the first: the others each run further into a start-up (4-11 s of CPU)
@pytest.mark.parametrize("point, signum, code", [
    ("torch.", signal.SIGINT, 130),
    pytest.param("torch", signal.SIGINT, 130, marks=pytest.mark.slow),
    pytest.param("torch", signal.SIGTERM, 143, marks=pytest.mark.slow),
    pytest.param("model", signal.SIGINT, 130, marks=pytest.mark.slow),
    pytest.param("cache", signal.SIGINT, 130, marks=pytest.mark.slow),
    pytest.param("cache", signal.SIGTERM, 143, marks=pytest.mark.slow),
], ids=["imports-torch", "imports-engine", "imports-engine-sigterm", "model", "cache", "cache-sigterm"])
def test_a_signal_during_start_up_stops_at_once_with_one_line(tmp_path, cache, point, signum, code):
    run, logs, fresh_cache = tmp_path / "run", tmp_path / "logs", tmp_path / "fresh_cache"
    # each signal waits for its point to show, never for a time: how far a process gets in 1 s depends on the machine
    python = ["-X", "importtime"] if point.startswith("torch") else []
    proc = start_run(run, fresh_cache if point == "cache" else cache, logs, python=python)
    if point.startswith("torch"):
        wait_until(lambda: imported(logs / "err", point), proc, f"the import of {point}")
    elif point == "model":
        wait_until(lambda: (run / ".gesso.lock").exists() and (run / ".gesso.lock").read_text(), proc, "the lock")
    else:
        wait_until(lambda: any(p.is_file() for p in fresh_cache.rglob("*.safetensors")), proc, "a cache file")
    proc.send_signal(signum)
    line = assert_one_interrupted_line(logs, code, proc.wait(timeout=300))
    assert line == f"interrupted ({signal.Signals(signum).name})"  # not "at step N": no step was trained
    # nothing of the run written and the lock released; at most the manifest, written before the run's first file
    # (a manifest alone leaves the folder new to any config: tests/engine/run/test_manifest.py)
    left = sorted(p.name for p in run.iterdir()) if run.exists() else []
    assert left in ([], [MANIFEST_FILE]) and (not left or read_manifest(run) is not None), left
    for p in fresh_cache.rglob("*.safetensors"):  # the cache files written before the signal are whole
        loadable(p)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before", "inside"])
def test_an_interrupt_at_the_optimizer_update_saves_only_an_exact_state(tmp_path, monkeypatch, capsys, cache, reference, where):
    """Ctrl-C raised as the 8th optimizer step begins (before the update: the state of step 7 is exact, saved) or
    inside it (weights part-way to step 8: not saved; the state.pt of epoch 1, step 6, stays as it was)."""
    # states at epoch ends only (step 6), so the two outcomes differ; the same training as the reference run's
    cfg = load_config(DEMO, [s for s in SETS if "save_every_n_steps" not in s] + [f"dataset.cache_dir='{cache}'"])
    real = train_module.train_optimizer
    calls = []

    def interrupted_optimizer(*args):
        opt = real(*args)

        def hook(optimizer, args, kwargs):
            calls.append(snapshot(tmp_path / "cut"))  # the folder as this step's update begins or ends
            if len(calls) == 8:
                raise KeyboardInterrupt

        (opt.register_step_pre_hook if where == "before" else opt.register_step_post_hook)(hook)
        return opt

    monkeypatch.setattr(train_module, "train_optimizer", interrupted_optimizer)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    out = capsys.readouterr().out
    if where == "before":
        assert "interrupted: resumable state saved" in out and load_state(tmp_path / "cut")["step"] == 7
    else:
        assert "inside the optimizer update of step 8: no state saved" in out
        before = {p: b for p, b in calls[-1].items() if p.name == "state.pt"}
        assert before
        assert_unchanged(before)
        assert load_state(tmp_path / "cut")["step"] == 6
    resumed = train(cfg, tmp_path / "cut", resume=tmp_path / "cut", progress=False)
    assert_same_as(reference, resumed.final)
