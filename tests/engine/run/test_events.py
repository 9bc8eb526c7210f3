"""What `train` tells its host: step and save events, a stop from the callback, and a callback that fails."""
import json
from pathlib import Path

import pytest
import torch

from gesso.engine.config.load import load_config
from gesso.engine.loop.train import train
from gesso.engine.lora.files import read_lora
from gesso.engine.run.events import StopTraining
from gesso.engine.run.manifest import MANIFEST_FILE
from gesso.engine.run.state import load_state

DEMO = Path(__file__).resolve().parents[3] / "tests" / "data" / "demo.toml"


def small(tmp_path, *extra):
    # 12 images x 2 repeats / batch 4 = 6 steps per epoch, 2 epochs
    return load_config(DEMO, ["train.epochs=2", "dataset.repeats=2", "output.save_dtype='fp32'", "sample.prompts=[]",
                              "output.tensorboard=false", f"dataset.cache_dir='{tmp_path / 'cache'}'", *extra])


def same_file(a: Path, b: Path) -> bool:
    x, y = read_lora(a)[0], read_lora(b)[0]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_every_step_and_every_file_written_is_an_event(tmp_path):
    cfg = small(tmp_path, "output.save_every_n_steps=4", "sample.prompts=['gssdemo, a circle']", "sample.steps=2",
                "sample.every_n_epochs=2")
    events = []
    result = train(cfg, tmp_path / "run", on_event=events.append, progress=False)
    assert events[0] == {"event": "start", "step": 0, "total_steps": 12, "epoch": 1}
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 13)) and {e["total_steps"] for e in steps} == {12}
    assert [e["epoch"] for e in steps] == [1] * 6 + [2] * 6
    assert all(e["loss"] > 0 and e["lr"] > 0 and e["steps_per_s"] > 0 and e["peak_memory_gib"] is None for e in steps)
    assert [e["loss"] for e in steps] == result.losses
    saves = [e for e in events if e["event"] == "save"]
    # every file the run left, and no other; the log and the manifest (which run the folder holds) are bookkeeping
    written = {p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name not in ("metrics.jsonl", MANIFEST_FILE)}
    assert {Path(e["path"]) for e in saves} == written and (tmp_path / "run" / MANIFEST_FILE).is_file()
    kinds = [(e["kind"], Path(e["path"]).name) for e in saves if e["kind"] != "state"]
    assert kinds == [("step", "demo-step00000004.safetensors"), ("epoch", "demo-000001.safetensors"),
                     ("step", "demo-step00000008.safetensors"), ("epoch", "demo-000002.safetensors"),
                     ("preview", "demo-e000002-00.png"), ("final", "demo.safetensors")]
    # every kind of event, saves of every kind among them, goes through JSON and back unchanged: a host forwards them
    assert {e["event"] for e in events} == {"start", "step", "save"}
    assert {e["kind"] for e in saves} == {"step", "epoch", "state", "preview", "final"}
    assert all(json.loads(json.dumps(e)) == e for e in events)


@pytest.mark.slow
def test_stop_from_the_callback_saves_state_and_resume_finishes_the_same_file(tmp_path):
    cfg = small(tmp_path)
    whole = train(cfg, tmp_path / "whole", progress=False)

    def stop_on_first_epoch_file(event):  # a stop on a save event, not a step: the file stays known to the state
        if event["event"] == "save" and event["kind"] == "epoch":
            raise StopTraining

    cut = train(cfg, tmp_path / "cut", on_event=stop_on_first_epoch_file, progress=False)
    assert cut.stopped_early and cut.final is None and cut.step == 6
    assert not (tmp_path / "cut" / "demo.safetensors").exists()
    assert load_state(tmp_path / "cut")["files"] == ["demo-000001.safetensors"]
    resumed = train(cfg, tmp_path / "cut", resume=tmp_path / "cut", progress=False)
    assert not resumed.stopped_early and same_file(resumed.final, whole.final)
    assert [p.name for p in resumed.epoch_files] == ["demo-000001.safetensors", "demo-000002.safetensors"]


@pytest.mark.slow
def test_an_exception_in_the_callback_leaves_a_resumable_state(tmp_path):
    cfg = small(tmp_path)
    whole = train(cfg, tmp_path / "whole", progress=False)

    def broken_host(event):
        if event["event"] == "step" and event["step"] == 3:
            raise RuntimeError("the host's websocket closed")

    with pytest.raises(RuntimeError, match="websocket closed"):
        train(cfg, tmp_path / "cut", on_event=broken_host, progress=False)
    assert load_state(tmp_path / "cut")["step"] == 3
    resumed = train(cfg, tmp_path / "cut", resume=tmp_path / "cut", progress=False)
    assert same_file(resumed.final, whole.final)
