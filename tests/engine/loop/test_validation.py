"""Validation on held-out images: kohya's split (3 of the demo's 12, named), the same split from a kohya dataset TOML
without a warning, one val_loss per epoch in metrics.jsonl and TensorBoard, the same number for the same weights, and
a training run that validates (on its own schedule and at a host's validate_now) trains exactly as one that does not."""
import json
import logging
from pathlib import Path

import pytest
import torch
from tensorboardX.proto import event_pb2

from gesso.engine import diffusion
from gesso.engine.config.load import load_config
from gesso.engine.loop.control import Control
from gesso.engine.loop.plan import Plan
from gesso.engine.loop.inputs import find_inputs, load_dataset
from gesso.engine.loop.train import prepare_run, train
from gesso.engine.loop.validation import validation_loss, validation_seed
from gesso.engine.lora.files import read_lora

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE, DEMO = ROOT / "examples" / "demo.toml", ROOT / "tests" / "data" / "demo.toml"


def test_the_demo_holds_out_3_of_12_images_named_in_the_steps_line():
    dataset = load_dataset(load_config(EXAMPLE, ["dataset.validation_split=0.25"]))
    held = sorted(it.path.name for it in dataset.held_out)
    assert len(dataset.items) == 9 and len(held) == 3
    assert not {it.path for it in dataset.items} & {it.path for it in dataset.held_out}
    line = Plan(dataset, 4, 9, validation=[it.path for it in dataset.held_out]).describe()
    assert line.startswith("9 images x 10 repeats") and all(name in line for name in held), line
    other = load_dataset(load_config(EXAMPLE, ["dataset.validation_split=0.25", "dataset.validation_seed=7"]))
    assert sorted(it.path.name for it in other.held_out) != held  # the seed chooses them


def test_a_kohya_dataset_toml_gives_the_same_split_with_no_warning(tmp_path, caplog):
    kohya = tmp_path / "kohya.toml"
    kohya.write_text(f'[general]\nvalidation_split = 0.25\nvalidation_seed = 42\nresolution = 128\n'
                     f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{EXAMPLE.parent / "demo" / "10_gssdemo"}"\n'
                     f'num_repeats = 10\n')
    with caplog.at_level(logging.WARNING):
        cfg = load_config(EXAMPLE, dataset_config=kohya)
    assert not [r for r in caplog.records if "validation" in r.getMessage()]
    ours = load_dataset(load_config(EXAMPLE, ["dataset.validation_split=0.25", "dataset.validation_seed=42"]))
    theirs = load_dataset(cfg)
    assert sorted(it.path for it in theirs.held_out) == sorted(it.path for it in ours.held_out) and len(theirs.held_out) == 3


def _scalars(folder: Path) -> dict[str, list[int]]:
    tags = {}
    for path in folder.glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):  # TFRecord: length, crc, payload, crc
            n = int.from_bytes(data[offset:offset + 8], "little")
            for v in event_pb2.Event.FromString(data[offset + 12:offset + 12 + n]).summary.value:
                tags.setdefault(v.tag, []).append(offset and v.simple_value)
            offset += 16 + n
    return tags


def small(tmp_path, *extra):
    # 9 trained images / batch 4 = 3 steps per epoch, 2 epochs
    return load_config(DEMO, ["train.epochs=2", "dataset.repeats=1", "sample.prompts=[]", "output.save_dtype='fp32'",
                              f"dataset.cache_dir='{tmp_path / 'cache'}'", *extra])


@pytest.mark.slow
def test_val_loss_once_per_epoch_in_metrics_tensorboard_events_and_the_same_for_the_same_weights(tmp_path, capsys):
    cfg = small(tmp_path, "dataset.validation_split=0.25")
    events = []
    result = train(cfg, tmp_path / "run", on_event=events.append, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert [(r["step"], r["epoch"]) for r in val] == [(3, 1), (6, 2)]
    assert [e["val_loss"] for e in events if e["event"] == "validation"] == [r["val_loss"] for r in val]
    assert len(_scalars(tmp_path / "run" / "tensorboard")["val_loss"]) == 2
    assert "validation loss" in capsys.readouterr().out
    # the final file's weights, evaluated twice, give the logged number twice
    sd, _, network, cache = prepare_run(find_inputs(cfg, torch.device("cpu")))
    tensors, _ = read_lora(result.final)
    for key, p in network.named_tensors().items():
        p.data.copy_(tensors[key])
    ac = diffusion.scaled_linear_alphas_cumprod()
    first = validation_loss(sd.unet, cache.validation, cfg.loss, ac, validation_seed(cfg))
    assert first == validation_loss(sd.unet, cache.validation, cfg.loss, ac, validation_seed(cfg))
    assert abs(first - val[-1]["val_loss"]) < 1e-6


@pytest.mark.slow
def test_validating_leaves_the_training_bit_identical(tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    for name in ("00", "05"):  # two demo images as a validation folder of their own
        for ext in (".png", ".txt"):
            (held / f"{name}{ext}").write_bytes((DEMO.parent / "demo" / f"{name}{ext}").read_bytes())
    plain = train(small(tmp_path), tmp_path / "plain", progress=False)
    control, events = Control(), []

    def host(event):  # a host's validate_now at steps 1 and 2 (where the run validates anyway: computed once)
        events.append(event)
        if event["event"] == "step" and event["step"] in (1, 2):
            control.validate_now()

    validated = train(small(tmp_path, f"dataset.validation_dir='{held}'", "train.validate_every_n_steps=2"),
                      tmp_path / "validated", on_event=host, progress=False, control=control)
    rows = [json.loads(line) for line in (tmp_path / "validated" / "metrics.jsonl").read_text().splitlines()]
    # asked at step 1, then every 2 steps and every epoch, once each
    assert [r["step"] for r in rows if "val_loss" in r] == [1, 2, 3, 4, 6]
    answers = [e for e in events if e["event"] == "control"]
    assert [(e["step"], e["done"], e["message"]) for e in answers] == [
        (s, True, f"validation loss {r['val_loss']:.6f}") for s, r in zip((1, 2), [r for r in rows if "val_loss" in r])]
    a, b = read_lora(plain.final)[0], read_lora(validated.final)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
