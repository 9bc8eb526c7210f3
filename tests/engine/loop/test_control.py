"""A host's requests while a run trains (gesso.Control), asked from another thread and answered at the next step
boundary with their events; and a run called under the host's torch.inference_mode() or torch.no_grad()."""
import threading
from pathlib import Path

import pytest
import torch

import gesso
from gesso.engine.config.load import load_config
from gesso.engine.loop.control import Control
from gesso.engine.loop.train import train
from gesso.engine.lora.files import read_lora
from gesso.engine.run.state import load_state

DEMO = Path(__file__).resolve().parents[3] / "tests" / "data" / "demo.toml"


def small(cache: Path, *extra):
    # 12 images / batch 4 = 3 steps per epoch, 2 epochs, at 64 px
    return load_config(DEMO, ["train.epochs=2", "dataset.repeats=1", "dataset.resolution=64", "output.save_dtype='fp32'",
                              "sample.prompts=[]", "output.tensorboard=false", f"dataset.cache_dir='{cache}'", *extra])


def same_file(a: Path, b: Path) -> bool:
    x, y = read_lora(a)[0], read_lora(b)[0]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def from_another_thread(*calls):
    """Call each of `calls` on a thread of its own, as a host's button handlers would, and wait for them."""
    threads = [threading.Thread(target=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, cache) -> Path:
    """The run no host disturbs: its final file."""
    return train(small(cache), tmp_path_factory.mktemp("plain"), progress=False).final


@pytest.mark.slow
def test_save_preview_and_validate_now_are_answered_at_the_next_step_with_their_events(tmp_path, cache, plain):
    control = Control()
    events = []

    def host(event):
        events.append(event)
        if event["event"] == "step" and event["step"] == 2:
            from_another_thread(control.save_now, control.sample_now, control.validate_now, control.save_now)

    cfg = small(cache, "sample.prompts=['gssdemo, a circle']", "sample.steps=2", "sample.every_n_epochs=0")
    result = train(cfg, tmp_path / "run", on_event=host, progress=False, control=control)
    after = events[[e.get("step") for e in events].index(2) + 1:]
    answered = after[:after.index(next(e for e in after if e["event"] == "step"))]  # up to step 3
    run = tmp_path / "run"
    assert [(e["event"], e.get("kind") or e.get("request")) for e in answered] == [
        ("save", "step"), ("save", "state"), ("control", "save_now"),  # save_now asked twice: answered once
        ("save", "preview"), ("control", "sample_now"), ("control", "validate_now")]
    assert answered[0]["path"] == str(run / "demo-step00000002.safetensors") and Path(answered[0]["path"]).is_file()
    assert answered[3]["path"] == str(run / "samples" / "demo-step00000002-00.png") and Path(answered[3]["path"]).is_file()
    assert {e["step"] for e in answered} == {2} and {e["epoch"] for e in answered} == {1}
    assert [(e["done"], e["message"]) for e in answered if e["event"] == "control"] == [
        (True, "saved demo-step00000002.safetensors"), (True, "rendered 1 preview(s)"), (False, "no validation configured")]
    # the requests changed nothing in the training: the same final file as the undisturbed run
    assert same_file(result.final, plain) and not result.stopped_early


def test_a_preview_asked_without_prompts_is_answered_not_done(tmp_path, cache):
    control = Control()
    control.sample_now()  # asked before the run starts: answered at its start, before the first step
    events = []
    train(small(cache, "train.epochs=1"), tmp_path / "run", on_event=events.append, progress=False, control=control)
    assert [e["event"] for e in events[:2]] == ["start", "control"]
    assert events[1] == {"event": "control", "request": "sample_now", "step": 0, "epoch": 1, "done": False,
                         "message": "no previews configured (sample.prompts is empty)"}
    assert not (tmp_path / "run" / "samples").exists()


@pytest.mark.slow
def test_stop_from_another_thread_saves_the_state_at_that_step_and_resume_finishes_the_same_file(tmp_path, cache, plain):
    control = Control()
    events = []

    def host(event):
        events.append(event)
        if event["event"] == "step" and event["step"] == 4:
            from_another_thread(control.stop)

    cut = train(small(cache), tmp_path / "run", on_event=host, progress=False, control=control)
    assert cut.stopped_early and cut.step == 4 and cut.final is None
    assert [(e["event"], e.get("request") or e.get("kind")) for e in events[-2:]] == [("control", "stop"), ("save", "state")]
    assert events[-2]["step"] == 4 and load_state(tmp_path / "run")["step"] == 4
    assert max(e["step"] for e in events if e["event"] == "step") == 4  # no step after the boundary it was answered at
    done = train(small(cache), tmp_path / "run", resume=tmp_path / "run", progress=False, control=control)
    assert same_file(done.final, plain)


def test_requests_from_many_threads_are_each_answered_once():
    control = Control()
    threads = [threading.Thread(target=getattr(control, name)) for name in ["stop", "save_now", "sample_now"] * 20]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert control.take() == ["save_now", "sample_now", "stop"]  # answer order: a stop comes after the saves
    assert control.take() == []


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
@pytest.mark.slow
def test_a_host_under_inference_mode_or_no_grad_trains_the_same_file_and_keeps_its_modes(tmp_path, cache, plain, mode):
    with mode():
        result = gesso.train(small(cache), tmp_path / "run", progress=False)
        # the host's modes, as it left them: ComfyUI's node goes on under inference mode
        assert torch.is_inference_mode_enabled() == (mode is torch.inference_mode) and not torch.is_grad_enabled()
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert same_file(result.final, plain)
