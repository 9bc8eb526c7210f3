"""The end-to-end slice on the bundled demo: it learns, saves what kohya saves, reloads, and repeats."""
import json
import re
from pathlib import Path

import pytest
import torch

from gesso import models
from gesso.engine.config.load import load_config
from gesso.engine.loop.inputs import find_inputs
from gesso.engine.loop.train import fixed_eval_loss, prepare_run, train
from gesso.engine.lora import names
from gesso.engine.lora import network as lora
from gesso.engine.lora.files import read_lora
from gesso.engine.lora.network import load_network
from gesso.engine.memory.network_setup import inject_network

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "tests" / "data" / "demo.toml"
KOHYA_KEY = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's demo run, once for the module (fp32 files so reloading is exact)."""
    out = tmp_path_factory.mktemp("demo")
    cfg = load_config(DEMO, ["output.save_dtype=fp32", f"dataset.cache_dir='{out / 'cache'}'"])
    return cfg, train(cfg, out)


@pytest.mark.slow
def test_demo_learns_on_a_fixed_evaluation_set(demo_run):
    # Same images, timesteps and noise before and after: a drop here is learning, not a different draw.
    cfg, result = demo_run
    sd, _, network, cache = prepare_run(find_inputs(cfg, torch.device("cpu")))
    network.remove()
    before = fixed_eval_loss(sd.unet, cache)
    load_network(sd.unet, result.final)
    after = fixed_eval_loss(sd.unet, cache)
    assert after <= 0.85 * before, f"eval loss {before:.4f} -> {after:.4f}: less than a 15% drop"


@pytest.mark.slow
def test_demo_writes_epoch_files_final_file_and_metrics(demo_run):
    cfg, result = demo_run
    names = sorted(p.name for p in result.output_dir.glob("*.safetensors"))
    assert names == [f"demo-{e:06d}.safetensors" for e in range(1, cfg.train.epochs + 1)] + ["demo.safetensors"]
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = 12 * cfg.dataset.repeats // cfg.train.batch_size * cfg.train.epochs  # the demo is all one 128x128 bucket
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert {r["epoch"] for r in rows} == set(range(1, cfg.train.epochs + 1))
    assert all(set(r) == {"step", "epoch", "loss", "lr"} and r["loss"] > 0 for r in rows)


@pytest.mark.slow
def test_demo_writes_previews_and_tensorboard_scalars(demo_run):
    from PIL import Image
    from tensorboardX.proto import event_pb2  # reads back what SummaryWriter wrote

    cfg, result = demo_run
    previews = sorted(p.name for p in (result.output_dir / "samples").glob("*.png"))
    assert previews == ["demo-e000002-00.png", "demo-e000004-00.png"]  # sample.every_n_epochs = 2
    image = Image.open(result.output_dir / "samples" / previews[-1])
    assert image.size == (128, 128) and image.text["parameters"].startswith(cfg.sample.prompts[0])
    tags = {}
    for path in (result.output_dir / "tensorboard").glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):  # TFRecord: length, crc, payload, crc
            n = int.from_bytes(data[offset:offset + 8], "little")
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + n])
            for v in event.summary.value:
                tags.setdefault(v.tag, []).append(event.step)
            offset += 16 + n
    steps = len(result.losses)
    assert tags["loss"] == tags["lr"] == tags["it_per_s"] == list(range(1, steps + 1))


@pytest.mark.slow
def test_saved_keys_follow_the_kohya_layout(demo_run):
    cfg, result = demo_run
    tensors, meta = read_lora(result.final)
    assert all(KOHYA_KEY.match(k) for k in tensors), [k for k in tensors if not KOHYA_KEY.match(k)][:3]
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    unet = models.build("tiny-sdxl", seed=0).unet
    assert modules == {names.kohya_name("lora_unet_", p) for p in names.attention_targets(unet) + names.locon_targets(unet)}
    assert "lora_unet_input_blocks_1_0_in_layers_2" in modules  # LoCon (the demo sets conv_rank)
    for m in modules:
        assert tensors[f"{m}.alpha"].ndim == 0 and tensors[f"{m}.alpha"].item() == cfg.network.alpha
        assert tensors[f"{m}.lora_down.weight"].shape[0] == cfg.network.rank == tensors[f"{m}.lora_up.weight"].shape[1]
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_dim"] == "8" and float(meta["ss_network_alpha"]) == 8.0
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "8.0"}
    assert json.loads(meta["ss_tag_frequency"])["demo"]["gssdemo"] == 12


@pytest.mark.slow
def test_reloaded_lora_reproduces_the_trained_model(demo_run):
    cfg, result = demo_run
    sd, _, network, cache = prepare_run(find_inputs(cfg, torch.device("cpu")))
    network.remove()
    g = torch.Generator().manual_seed(7)
    _, context, y = next(cache.fixed_batches(2))
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([100, 700])
    base = sd.unet(x, t, context, y)
    # The trained network as the trainer holds it: put the final weights into a fresh injection by hand.
    tensors, _ = read_lora(result.final)
    trained = inject_network(sd.unet, cfg)
    for name, m in trained.modules.items():
        m.lora_down.data.copy_(tensors[f"{name}.lora_down.weight"])
        m.lora_up.data.copy_(tensors[f"{name}.lora_up.weight"])
    expected = sd.unet(x, t, context, y)
    trained.remove()
    assert torch.equal(sd.unet(x, t, context, y), base)  # removal restores the base model exactly
    fresh = models.build("tiny-sdxl", seed=cfg.model.seed)
    load_network(fresh.unet, result.final)
    got = fresh.unet(x, t, context, y)
    assert not torch.allclose(got, base, atol=1e-4)  # the LoRA changes the output ...
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # ... exactly as trained


def test_zero_initialised_lora_leaves_the_unet_unchanged():
    sd = models.build("tiny-sdxl", seed=0)
    g = torch.Generator().manual_seed(3)
    x, context, y = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 96, generator=g), torch.randn(2, 1600, generator=g)
    t = torch.tensor([5, 900])
    before = sd.unet(x, t, context, y)
    network = lora.inject(sd.unet, names.attention_targets(sd.unet), "lora_unet_", rank=4, alpha=1)
    assert torch.equal(sd.unet(x, t, context, y), before)
    assert all(m.lora_down.abs().sum() > 0 for m in network.modules.values())  # only up is zero


@pytest.mark.slow
def test_same_seed_gives_identical_tensors(tmp_path):
    overrides = ["train.epochs=1", "dataset.repeats=1", "output.save_dtype=fp32", f"dataset.cache_dir='{tmp_path / 'cache'}'"]
    cfg = load_config(DEMO, overrides)
    a = read_lora(train(cfg, tmp_path / "a").final)[0]
    b = read_lora(train(cfg, tmp_path / "b").final)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = read_lora(train(load_config(DEMO, overrides + ["train.seed=7"]), tmp_path / "c").final)[0]
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("up.weight"))  # the seed matters


@pytest.mark.slow
def test_training_from_a_checkpoint_file_equals_training_the_built_in_model(tmp_path):
    # model.checkpoint takes a single file: the tiny model saved in the original layout trains exactly like
    # the built-in model it came from (same weights, same seed, same files).
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in models.build("tiny-sdxl", seed=0).state_dict().items()}
    save_file(state, tmp_path / "tiny.safetensors")
    overrides = ["train.epochs=1", "dataset.repeats=1", "output.save_dtype=fp32", "sample.prompts=[]",
                 f"dataset.cache_dir='{tmp_path / 'cache'}'"]
    built_in = read_lora(train(load_config(DEMO, overrides), tmp_path / "a").final)
    from_file = read_lora(train(load_config(DEMO, overrides + [f"model.checkpoint='{tmp_path / 'tiny.safetensors'}'"]), tmp_path / "b").final)
    assert built_in[0].keys() == from_file[0].keys() and all(torch.equal(built_in[0][k], from_file[0][k]) for k in built_in[0])
    assert from_file[1]["ss_sd_model_name"].endswith("tiny.safetensors")


@pytest.mark.slow
def test_grid_of_three_epochs_by_four_strengths_renders_from_the_demo_run(demo_run):
    import numpy as np
    from PIL import Image

    from gesso import cli

    _, result = demo_run
    out = result.output_dir / "grid"
    rc = cli.main(["grid", "--run", str(result.output_dir), "--prompt", "gssdemo, a red circle", "--x", "epoch=1,2,3",
                   "--y", "strength=0.25,0.5,0.75,1", "--steps", "4", "--seed", "1", "--out", str(out)])
    assert rc == 0
    grids = list(out.glob("xy_grid-*.png"))
    singles = sorted(p for p in out.glob("*.png") if p not in grids)
    assert len(grids) == 1 and len(singles) == 12
    pixels = [np.asarray(Image.open(p)) for p in singles]
    assert len({p.tobytes() for p in pixels}) == 12  # every epoch and strength renders something different
    w, h = Image.open(grids[0]).size
    assert w >= 3 * 128 and h >= 4 * 128


@pytest.mark.slow
def test_bf16_run_computes_in_bf16_without_autocast_and_previews_with_fp8_bases(tmp_path):
    # mixed_precision = bf16: the frozen UNet runs in bf16 end to end, norms included (autocast would give
    # fp32 norm outputs, and keep them for backward); fp8 bases take bf16 inputs and previews still render
    norm_dtypes = set()

    def hook(module, args, output):
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and torch.is_grad_enabled():
            norm_dtypes.add(output.dtype)

    overrides = ["train.epochs=1", "dataset.repeats=1", "train.mixed_precision='bf16'", "train.fp8_base=true",
                 "sample.every_n_epochs=1", "sample.steps=2", f"dataset.cache_dir='{tmp_path / 'cache'}'"]
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        result = train(load_config(DEMO, overrides), tmp_path / "out")
    finally:
        handle.remove()
    assert norm_dtypes == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(result.losses))) and result.final.exists()
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1


def test_run_loads_in_the_training_precision_with_an_fp32_vae(tmp_path):
    # the model loads on the CPU already in bf16 (14 GB of fp32 SDXL never reaches the GPU), the VAE stays fp32
    cfg = load_config(DEMO, ["train.mixed_precision='bf16'", f"dataset.cache_dir='{tmp_path / 'cache'}'"])
    sd, _, network, _ = prepare_run(find_inputs(cfg, torch.device("cpu")))
    assert {p.dtype for p in sd.unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for e in sd.text_encoders for p in e.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in sd.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in network.parameters()} == {torch.float32}
