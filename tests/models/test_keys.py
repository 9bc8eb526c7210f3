"""Key names, shapes and parameter counts of the engine's definitions against the real releases.

Full-size models are built on the meta device (no memory). Where each expected figure comes from:
- parameter counts and tensor counts per prefix: REFERENCE.md, "SDXL single-file checkpoint" (counted from the
  headers of sd_xl_base_1.0.safetensors and v1-5-pruned-emaonly.safetensors; the text tower counts equal
  transformers' CLIPTextModel / CLIPTextModelWithProjection for openai/clip-vit-large-patch14 and
  laion/CLIP-ViT-bigG-14); SD 2.1's UNet count is diffusers' stabilityai/stable-diffusion-2-1 unet;
- shapes named below: REFERENCE.md, "SDXL architecture constants";
- every other key and shape: diffusers' single-file converter, which maps each original key onto a diffusers
  module of the real config and so encodes the release's names.
"""
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from models_testutil import diffusers_unet_config

from gesso import models
from gesso.models.configs import SD15, SD21, SDXL_BASE


def prefix_counts(state: dict, prefixes: list[str]) -> dict[str, int]:
    return {p: sum(k.startswith(p) for k in state) for p in prefixes}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def sdxl():
    return models.build(SDXL_BASE, device="meta")


def test_sdxl_counts(sdxl):
    state = sdxl.state_dict()
    assert len(state) == 2515
    prefixes = ["model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                "conditioner.embedders.1.model."]
    assert prefix_counts(state, prefixes) == dict(zip(prefixes, [1680, 248, 197, 390]))
    te1, te2 = sdxl.text_encoders
    assert [n_params(m) for m in (sdxl.unet, sdxl.vae, te1, te2)] == [2_567_463_684, 83_653_863, 123_060_480,
                                                                      694_659_840]


def test_sdxl_named_shapes(sdxl):
    shape = {k: tuple(v.shape) for k, v in sdxl.state_dict().items()}
    u, g = "model.diffusion_model.", "conditioner.embedders.1.model."
    assert shape[u + "label_emb.0.0.weight"] == (1280, 2816)
    assert shape[u + "time_embed.0.weight"] == (1280, 320)
    assert shape[u + "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight"] == (640 * 8, 640)
    assert shape[u + "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight"] == (1280, 1280 * 4)
    assert shape[u + "middle_block.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert shape[u + "input_blocks.4.1.proj_in.weight"] == (640, 640)  # Linear: use_linear_in_transformer
    assert shape[u + "output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shape[u + "output_blocks.5.2.conv.weight"] == (640, 640, 3, 3)
    assert u + "input_blocks.1.1.proj_in.weight" not in shape  # no attention at level 0
    assert u + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.bias" not in shape
    assert shape["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shape[g + "token_embedding.weight"] == (49408, 1280)
    assert shape[g + "positional_embedding"] == (77, 1280)
    assert shape[g + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shape[g + "transformer.resblocks.31.mlp.c_fc.weight"] == (5120, 1280)
    assert shape[g + "text_projection"] == (1280, 1280)
    assert shape[g + "logit_scale"] == ()
    assert shape["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] == (1, 77)
    assert sdxl.state_dict()["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"].dtype == (
        torch.int64)


def test_sd15_counts_and_shapes():
    model = models.build(SD15, device="meta")
    state = model.state_dict()
    prefixes = ["model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."]
    assert prefix_counts(state, prefixes) == dict(zip(prefixes, [686, 248, 197]))
    assert len(state) == 686 + 248 + 197
    assert n_params(model.unet) == 859_520_964
    assert tuple(state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape) == (320, 320, 1, 1)
    assert tuple(state["model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (
        320, 768)
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in state  # diffusers' SD 1.x marker


def test_sd21_unet_count():
    assert n_params(models.build(SD21, device="meta").unet) == 865_910_724


@pytest.mark.parametrize("cfg", [SDXL_BASE, SD15, SD21], ids=["sdxl", "sd15", "sd21"])
def test_unet_keys_and_shapes_are_what_diffusers_converter_expects(cfg):
    """Every original key converts to a diffusers key of the real config with the same number of elements."""
    state = models.build(cfg, device="meta").state_dict()
    config = diffusers_unet_config(cfg)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config).state_dict()
    converted = sfu.convert_ldm_unet_checkpoint({k: v for k, v in state.items() if k.startswith("model.")}, config)
    assert len(converted) == len(ref) == sum(k.startswith("model.diffusion_model.") for k in state)
    assert sorted(converted) == sorted(ref)
    assert {k: v.numel() for k, v in converted.items()} == {k: v.numel() for k, v in ref.items()}


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15", "tiny-sd2"])
def test_tiny_configs_have_the_full_size_key_structure(name):
    """Tiny and full-size models differ in widths and depths only: the same key names once indices are dropped."""
    full = {"tiny-sdxl": SDXL_BASE, "tiny-sd15": SD15, "tiny-sd2": SD21}[name]

    def pattern(key: str) -> str:
        return ".".join("N" if part.isdigit() else part for part in key.split("."))

    tiny_keys = models.build(name).state_dict().keys()
    full_keys = models.build(full, device="meta").state_dict().keys()
    assert {pattern(k) for k in tiny_keys} == {pattern(k) for k in full_keys}


def test_registry():
    assert models.configs.get("tiny-sdxl") is models.configs.TINY_SDXL
    assert models.configs.get("sdxl").family == "sdxl"
    with pytest.raises(KeyError, match="known: .*sd15.*sdxl.*tiny-sdxl"):
        models.configs.get("sdxl-turbo")
