"""ComfyUI and AUTOMATIC1111 do not install from the package registry: the key names each accepts are derived here
from their documented mapping, applied to the checkpoint's own key layout, and every key of our files must be among them.

Sources (read for facts, not copied):
- ComfyUI comfy/lora.py: `model_lora_keys_unet` accepts `lora_unet_` + every UNet weight key (minus `diffusion_model.`
  and `.weight`, dots to underscores), and the same for the diffusers names of `comfy.utils.unet_to_diffusers`
  (diffusers key -> original key; derived below with diffusers' own converter, the same mapping);
  `model_lora_keys_clip` accepts `lora_te_`/`lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP}` for CLIP-L and
  `lora_te2_...` for SDXL's clip_g, LORA_CLIP_MAP = {self_attn_q/k/v/out_proj, mlp_fc1, mlp_fc2}; `load_lora` reads
  `{x}.lora_up.weight` + `{x}.lora_down.weight` and optional `{x}.alpha`, and warns "lora key not loaded" otherwise.
- AUTOMATIC1111 extensions-builtin/Lora/networks.py: `assign_network_names_to_compvis_modules` names modules
  `name.replace(".", "_")` over `sd_model.model` (`diffusion_model_...`) and the text encoders (SDXL: `{i}_` + the
  embedder's module names; SD 1: the CLIP's); `load_network` splits keys at the first dot, maps diffusers-style names
  with `convert_diffusers_name_to_compvis`, falls back to `(.*)_([qkv]_proj)$` (OpenCLIP's fused MultiheadAttention,
  applied only when q, k, v and out_proj are all present), then `lora_unet` -> `diffusion_model` and
  `lora_te1_text_model` -> `0_transformer_text_model`; network_lora accepts `lora_up.weight`/`lora_down.weight`(/`alpha`).
  It reads header bytes 8..10 as `{"`, lists a LoRA as SDXL when `ss_base_model_version` starts with `sdxl_`, and
  parses metadata values starting with `{` as JSON.
"""
import json
import re

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from formats_testutil import random_network, tiny
from models_testutil import diffusers_unet_config

from gesso.engine.lora import formats as lora_convert
from gesso.engine.lora.files import read_lora, save_lora

LORA_CLIP_MAP = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
SUFFIXES = ("lora_up.weight", "lora_down.weight", "alpha")
SUFFIX_CONVERSION = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def unet_to_diffusers(sd) -> dict[str, str]:
    """diffusers UNet key -> original key, by running diffusers' single-file converter on index-tagged tensors."""
    keys = [k for k in sd.state_dict() if k.startswith("model.diffusion_model.")]
    tagged = {k: torch.full(v.shape, float(i)) for i, (k, v) in enumerate((k, sd.state_dict()[k]) for k in keys)}
    converted = sfu.convert_ldm_unet_checkpoint(tagged, diffusers_unet_config(sd.cfg))
    return {k: keys[int(v.flatten()[0])].removeprefix("model.") for k, v in converted.items()}


def comfyui_keys(sd) -> set[str]:
    state = sd.state_dict()
    names = {"lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
             for k in state if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    names |= {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k in unet_to_diffusers(sd) if k.endswith(".weight")}
    towers = [(te, prefixes) for te, prefixes in zip(sd.cfg.text_encoders, (("lora_te_", "lora_te1_"), ("lora_te2_",)))]
    for te, prefixes in towers:
        names |= {f"{p}text_model_encoder_layers_{b}_{c}" for p in prefixes for b in range(te.layers) for c in LORA_CLIP_MAP}
    return names


def a1111_layer_names(sd) -> set[str]:
    """`network_layer_mapping` keys: module names of the checkpoint layout (every dotted prefix of a weight key)."""
    names = set()
    for key in sd.state_dict():
        parts = key.split(".")
        for n in range(1, len(parts)):
            module = ".".join(parts[:n])
            if module.startswith("model."):
                names.add(module.removeprefix("model.").replace(".", "_"))
            elif m := re.match(r"conditioner\.embedders\.(\d+)\.(.+)", module):
                names.add(f"{m[1]}_{m[2].replace('.', '_')}")
            elif module.startswith("cond_stage_model."):
                names.add(module.removeprefix("cond_stage_model.").replace(".", "_"))
    return names


def a1111_convert(key: str) -> str:
    """The rules of convert_diffusers_name_to_compvis that apply to SD 1.x/SDXL kohya names."""
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = SUFFIX_CONVERSION.get(m[4], m[4]) if m[2] == "resnets" else m[4]
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = SUFFIX_CONVERSION.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = SUFFIX_CONVERSION.get(m[4], m[4]) if m[2] == "resnets" else m[4]
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{m[1]}_{rest}"
    return key


def a1111_module(key: str, layers: set[str]) -> str | None:
    converted = a1111_convert(key)
    if converted in layers:
        return converted
    if (m := re.match(r"(.*)_([qkv]_proj)$", converted)) and m[1] in layers:
        return m[1]
    for old, new in (("lora_unet", "diffusion_model"), ("lora_te1_text_model", "0_transformer_text_model")):
        if old in key and key.replace(old, new) in layers:
            return key.replace(old, new)
    return None


def our_file(name: str, tmp_path):
    """A file from our writer: the trainer's UNet modules (attention + LoCon) and every text-encoder module."""
    sd = tiny(name)
    network = random_network(sd.unet, seed=1)
    tensors = network.kohya_state_dict(torch.float16)
    network.remove()
    layout = lora_convert.layout(sd.cfg)
    te = {n: lora_convert.Module(torch.ones(2, t.shape[1]), torch.ones(t.shape[0], 2), 1.0)
          for n, t in layout.targets.items() if n.startswith("lora_te")}
    tensors |= lora_convert.to_kohya(lora_convert.LoRA(te, {}, layout), torch.float16)
    save_lora(tmp_path / "plain.safetensors", tensors, {})
    metadata = lora_convert.kohya_metadata(lora_convert.read(tmp_path / "plain.safetensors", sd.cfg), sd.cfg.family, "ours")
    path = tmp_path / "ours.safetensors"
    save_lora(path, tensors, metadata | {"ss_tag_frequency": json.dumps({"1_demo": {"red circle": 3}})})
    return sd, path


def modules_of(tensors: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for key in tensors:
        module, _, suffix = key.partition(".")  # A1111 splits at the first dot
        out.setdefault(module, set()).add(suffix)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_comfyui_maps_every_key(name, tmp_path):
    sd, path = our_file(name, tmp_path)
    tensors, _ = read_lora(path)
    accepted = comfyui_keys(sd)
    modules = modules_of(tensors)
    assert len(modules) == len(tensors) // 3
    for module, suffixes in modules.items():
        assert module in accepted, module
        assert suffixes == set(SUFFIXES), module  # up and down together: nothing left as "lora key not loaded"


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_a1111_maps_every_key_and_reads_the_header(name, tmp_path):
    sd, path = our_file(name, tmp_path)
    tensors, metadata = read_lora(path)
    layers = a1111_layer_names(sd)
    fused: dict[str, set[str]] = {}
    for module, suffixes in modules_of(tensors).items():
        target = a1111_module(module, layers)
        assert target is not None, module
        assert {"lora_up.weight", "lora_down.weight"} <= suffixes <= set(SUFFIXES), module
        if target.endswith("_attn") and target.startswith("1_model"):  # OpenCLIP's MultiheadAttention
            fused.setdefault(target, set()).add(module.rsplit("_", 2)[-2])
    assert bool(fused) == (name == "tiny-sdxl")  # SDXL's second encoder is OpenCLIP: the loop below checks something
    for target, projections in fused.items():  # applied only as a complete q, k, v (+ out_proj, mapped directly)
        assert projections == {"q", "k", "v"}, target

    raw = path.read_bytes()
    assert raw[8:10] == b'{"'
    for value in metadata.values():
        if value.startswith("{"):
            json.loads(value)
    version = metadata["ss_base_model_version"]
    assert version.startswith("sdxl_") == (sd.cfg.family == "sdxl") and version
