"""LoRA on the text encoders: kohya's te1/te2 names, OpenCLIP's q/k/v on rows of the fused in_proj, training, and
agreement with the reader and merger that tests/engine/lora/test_diffusers_interop.py checks against diffusers."""
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gesso import models
from gesso.engine.config.load import load_config
from gesso.engine.loop.inputs import find_inputs
from gesso.engine.loop.train import prepare_run, train
from gesso.engine.lora import formats as lora_convert
from gesso.engine.lora import names
from gesso.engine.lora import network as lora
from gesso.engine.lora import tools as lora_tools
from gesso.engine.lora.files import read_lora, save_lora
from gesso.engine.memory.network_setup import param_groups
from gesso.engine.run.state import load_state, restore_network

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "tests" / "data" / "demo.toml"
LINEARS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def te_names(cfg) -> set[str]:
    """Kohya's text-encoder module names for a model config: 6 per layer of each tower."""
    prefixes = ("lora_te1_", "lora_te2_") if cfg.family == "sdxl" else ("lora_te_",)
    return {f"{p}text_model_encoder_layers_{i}_{s}" for p, te in zip(prefixes, cfg.text_encoders)
            for i in range(te.layers) for s in LINEARS}


def prompt_ids(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((3, 77), 49407)
    ids[:, 0] = 49406
    ids[:, 1:12] = torch.randint(0, 49406, (3, 11), generator=g)
    ids[2, 12] = 0  # an odd token past the end marker
    return ids


def encode(sd, ids):
    with torch.no_grad():
        return sd.encode_text([ids] * len(sd.text_encoders))


def randomised(network, seed: int, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return network


@pytest.fixture(scope="module")
def te_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("te")
    cfg = load_config(DEMO, ["train.epochs=1", "dataset.repeats=2", "sample.prompts=[]", "output.save_dtype='fp32'",
                             f"dataset.cache_dir='{out / 'cache'}'", "network.train_text_encoders=true",
                             "train.text_encoder_lr=5e-4"])
    return cfg, train(cfg, out)


@pytest.mark.slow
def test_saved_file_has_kohya_te_modules_and_they_train(te_run):
    cfg, result = te_run
    tensors, meta = read_lora(result.final)
    modules = {k.split(".")[0] for k in tensors}
    model_cfg = models.configs.get(cfg.model.name)
    expected = te_names(model_cfg)
    assert len(expected) == 6 * (3 + 3)  # tiny-sdxl: 3 CLIP-L layers, 3 bigG layers
    assert {m for m in modules if m.startswith("lora_te")} == expected
    assert all(tensors[f"{m}.lora_down.weight"].shape[0] == cfg.network.rank for m in expected)
    # SDXL conditions on CLIP-L's penultimate layer: its last layer gets no gradient, its up weights stay zero
    # (kohya creates and saves those modules too). Every other module trained away from its zero init.
    last = f"lora_te1_text_model_encoder_layers_{model_cfg.text_encoders[0].layers - 1}_"
    for m in sorted(expected):
        up = tensors[f"{m}.lora_up.weight"]
        assert (up.abs().max() == 0) if m.startswith(last) else (up.abs().max() > 0), m
    assert meta["ss_text_encoder_lr"] == "0.0005" and meta["ss_unet_lr"] == str(cfg.train.learning_rate)
    assert meta["ss_network_train_unet_only"] == "False"


@pytest.mark.slow
def test_saved_file_is_read_whole_by_the_converter(te_run):
    cfg, result = te_run
    lo = lora_convert.read(result.final, models.configs.get(cfg.model.name))
    assert lo.unplaced == []
    assert set(lo.modules) == {k.split(".")[0] for k in read_lora(result.final)[0]}


@pytest.mark.slow
def test_resume_state_restores_te_modules(te_run):
    cfg, result = te_run
    state = load_state(result.output_dir)
    tensors, _ = read_lora(result.final)
    assert {k for k in state["lora"] if k.startswith("lora_te")} == {k for k in tensors if k.startswith("lora_te")}
    _, _, network, _ = prepare_run(find_inputs(cfg, torch.device("cpu")))
    restore_network(network, state)
    name = "lora_te2_text_model_encoder_layers_1_self_attn_k_proj"
    assert torch.equal(network.modules[name].lora_up.detach(), tensors[f"{name}.lora_up.weight"])


def test_param_groups_put_te_lora_at_its_own_rate():
    cfg = load_config(DEMO, ["network.train_text_encoders=true", "train.text_encoder_lr=3e-5", "network.conv_rank=0"])
    sd = models.build("tiny-sdxl", seed=0)
    network = lora.combine(lora.inject(sd.unet, names.attention_targets(sd.unet), "lora_unet_", 4, 4.0),
                           lora.inject_text_encoders(sd, 4, 4.0))
    unet_group, te_group = param_groups(network, cfg.train)
    assert "lr" not in unet_group and te_group["lr"] == 3e-5
    assert len(te_group["params"]) == 2 * 36 and len(unet_group["params"]) == 2 * len(names.attention_targets(sd.unet))
    same = param_groups(network, dataclasses.replace(cfg.train, text_encoder_lr=0.0))
    assert same[1]["lr"] == cfg.train.learning_rate


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_zero_init_leaves_text_outputs_unchanged_and_remove_restores(name):
    sd = models.build(name, seed=2).eval()
    ids = prompt_ids(0)
    context, pooled = encode(sd, ids)
    network = lora.inject_text_encoders(sd, 4, 3.0)
    assert set(network.modules) == te_names(sd.cfg)
    got_context, got_pooled = encode(sd, ids)
    assert torch.equal(got_context, context) and (pooled is None or torch.equal(got_pooled, pooled))
    randomised(network, 1)
    assert (encode(sd, ids)[0] - context).abs().max() > 1e-2
    network.remove()
    assert not any(isinstance(m, lora.LORA_TYPES + (lora.LoRARows,)) for m in sd.modules())
    assert torch.equal(encode(sd, ids)[0], context)


def test_fused_qkv_lora_equals_weight_merge_on_its_rows():
    # rank 3, alpha 5: scale 5/3 per module, so a missing or doubled scale shows
    sd = models.build("tiny-sdxl", seed=3).eval()
    reference = models.build("tiny-sdxl", seed=3).eval()
    network = randomised(lora.inject_text_encoders(sd, 3, 5.0), 4)
    with torch.no_grad():
        for name, m in network.modules.items():
            _, path, _ = network.paths[name]
            delta = (5.0 / 3) * m.lora_up @ m.lora_down
            if isinstance(m, lora.LoRARows):
                start, stop = m.rows
                reference.get_submodule(path).in_proj_weight[start:stop] += delta
            else:
                reference.get_submodule(path).weight += delta
    ids = prompt_ids(5)
    (context, pooled), (ref_context, ref_pooled) = encode(sd, ids), encode(reference, ids)
    assert (context - encode(models.build("tiny-sdxl", seed=3), ids)[0]).abs().max() > 1e-2
    torch.testing.assert_close(context, ref_context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5)


def test_saved_te_lora_merged_by_lora_tools_equals_injected(tmp_path):
    # lora_tools.merge_lora places te2 q/k/v by lora_convert's layout, which tests/engine/lora/test_diffusers_interop.py checks against diffusers
    base = models.build("tiny-sdxl", seed=6).eval()
    save_file({k: v for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    network = randomised(lora.inject_text_encoders(base, 4, 2.0), 7)
    save_lora(tmp_path / "te.safetensors", network.kohya_state_dict(), {})
    counts = lora_tools.merge_lora(tmp_path / "base.safetensors", [(tmp_path / "te.safetensors", 1.0)], tmp_path / "merged.safetensors")
    assert list(counts.values()) == [36]
    merged = models.load_model(tmp_path / "merged.safetensors")
    ids = prompt_ids(8)
    (context, pooled), (merged_context, merged_pooled) = encode(base, ids), encode(merged, ids)
    network.remove()
    assert (encode(base, ids)[0] - context).abs().max() > 1e-2
    torch.testing.assert_close(merged_context, context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_pooled, pooled, rtol=1e-5, atol=1e-5)
