"""output.save_every_n_minutes: a resumable state (and with output.timed_lora the step's LoRA file) by the clock,
counted from the last state saved, shown with a fake clock on which every optimizer step takes 4 minutes."""
import json
from pathlib import Path

import pytest

from gesso.engine.config.load import load_config
from gesso.engine.loop import train as train_module
from gesso.engine.loop.train import run_training
from gesso.engine.run.state import load_state

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "tests" / "data" / "demo.toml"
# 12 images x 2 repeats / batch 4 at 64 px = 6 steps per epoch, 2 epochs: 12 steps; no per-epoch files
SETS = ["train.epochs=2", "dataset.repeats=2", "dataset.resolution=64", "sample.prompts=[]", "output.tensorboard=false",
        "output.save_dtype='fp32'", "output.save_every_n_epochs=0", "output.save_every_n_minutes=10"]
STEP_MINUTES = 4


class FakeClock:
    def __init__(self):
        self.now = 1000.0  # monotonic clocks start anywhere

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run_with_clock(folder: Path, cache: Path, monkeypatch, *extra: str) -> list[tuple[str, int]]:
    """Train with a fake clock that each optimizer step moves on by STEP_MINUTES; the (kind, step) of every save."""
    clock, saves = FakeClock(), []
    real = train_module.train_optimizer

    def timed_optimizer(*args):
        opt = real(*args)
        opt.register_step_post_hook(lambda *args: setattr(clock, "now", clock.now + STEP_MINUTES * 60))
        return opt

    monkeypatch.setattr(train_module, "train_optimizer", timed_optimizer)
    cfg = load_config(DEMO, [*SETS, f"dataset.cache_dir='{cache}'", *extra])
    events = []
    run_training(cfg, folder, progress=False, clock=clock, on_event=events.append)
    assert all(json.loads(json.dumps(e)) == e for e in events)  # timed saves' events go through JSON as the others do
    saves += [(e["kind"], e["step"]) for e in events if e["event"] == "save"]
    return saves


@pytest.mark.slow
def test_a_state_every_10_minutes_and_a_lora_file_with_timed_lora(tmp_path, cache, monkeypatch):
    saves = run_with_clock(tmp_path, cache, monkeypatch, "output.timed_lora=true")
    # steps end at 4, 8, 12 ... minutes: 12 >= 10 at step 3, then 12 minutes after each save at steps 6 and 9; the
    # last step (12) saves its state at the epoch's end and the final file, never a timed one
    assert [s for k, s in saves if k == "state"] == [3, 6, 9, 12]
    assert [s for k, s in saves if k == "step"] == [3, 6, 9]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "demo-step00000003.safetensors", "demo-step00000006.safetensors", "demo-step00000009.safetensors", "demo.safetensors"]


@pytest.mark.slow
def test_the_clock_counts_from_the_last_state_saved_by_any_rule(tmp_path, cache, monkeypatch):
    # per-step states at 5 and 10 restart the count: timed states at 3 (12 min), 8 (12 min after step 5's), none at 11
    saves = run_with_clock(tmp_path, cache, monkeypatch, "output.save_every_n_steps=5")
    assert [s for k, s in saves if k == "state"] == [3, 5, 8, 10, 12]
    assert [s for k, s in saves if k == "step"] == [5, 10]  # timed_lora off: the timed saves write no LoRA file
    assert load_state(tmp_path)["step"] == 12


@pytest.mark.slow
def test_without_save_every_n_minutes_the_clock_saves_nothing(tmp_path, cache, monkeypatch):
    saves = run_with_clock(tmp_path, cache, monkeypatch, "output.save_every_n_minutes=0")
    assert [s for k, s in saves if k == "state"] == [12]
