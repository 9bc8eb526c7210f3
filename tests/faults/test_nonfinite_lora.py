"""A LoRA file holding NaN or Inf (a diverged run's epoch file) is refused by `convert`, `merge`, `resize` and
`sample` with one error line naming the file and the module, before anything is written: merged, it would fill the
checkpoint's weights with NaN; sampled, render noise; resized, break the SVD. The valid file passes each command."""
import json
from pathlib import Path

import pytest
import torch
from faults_testutil import RANK, assert_one_line_error, assert_unchanged, gesso_cli, gesso_main, lora_tensors, snapshot, temp_litter
from safetensors.torch import load_file, save_file

from gesso import models
from gesso.engine.lora import formats, names
from gesso.engine.lora.files import read_lora, save_lora
from gesso.engine.lora.tools import convert_lora

META = {"ss_sd_model_name": "tiny-sdxl", "ss_base_model_version": "sdxl_base_v1-0"}
UNET_UP, UNET_DOWN = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "lora_unet_middle_block_1_proj_out"
TE2_Q = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"  # a row slice of OpenCLIP's fused in_proj_weight
# file stem -> (key to spoil, the value put in its first element, module and tensor the error must name)
SPOILED = {
    "nan_up": (f"{UNET_UP}.lora_up.weight", float("nan"), UNET_UP, "up weight"),
    "inf_down": (f"{UNET_DOWN}.lora_down.weight", float("inf"), UNET_DOWN, "down weight"),
    "nan_alpha": (f"{UNET_UP}.alpha", float("nan"), UNET_UP, "alpha"),
    "te_nan_up": (f"{TE2_Q}.lora_up.weight", float("nan"), TE2_Q, "up weight"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """base.safetensors (a tiny-sdxl checkpoint, fp16), good.safetensors, each SPOILED copy, and peft_nan_alpha.safetensors:
    diffusers' layout whose lora_adapter_metadata gives one module a NaN alpha."""
    folder = tmp_path_factory.mktemp("nonfinite")
    sd = models.build("tiny-sdxl", seed=0)
    # fp16 halves the 74 MB every case snapshots and merge rewrites
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.state_dict().items()}, str(folder / "base.safetensors"))
    tensors = lora_tensors(sd.cfg)
    assert all(key in tensors for key, *_ in SPOILED.values())
    save_lora(folder / "good.safetensors", tensors, META)
    for stem, (key, value, _, _) in SPOILED.items():
        spoiled = tensors[key].clone()
        spoiled.view(-1)[0] = value
        save_lora(folder / f"{stem}.safetensors", tensors | {key: spoiled}, META)

    scratch = tmp_path_factory.mktemp("scratch")
    diffusers = convert_lora(folder / "good.safetensors", scratch / "d.safetensors", "diffusers", "tiny-sdxl")
    peft_meta = {"unet.lora_alpha": RANK, "unet.alpha_pattern": {peft_path(sd.cfg): float("nan")}}
    save_file(read_lora(diffusers)[0], str(folder / "peft_nan_alpha.safetensors"),
              {"lora_adapter_metadata": json.dumps(peft_meta)})
    return folder


def peft_path(cfg) -> str:
    """UNET_UP's module path in diffusers' UNet, as PEFT's alpha_pattern names it."""
    target = formats.layout(cfg).targets[UNET_UP]
    return names.original_to_diffusers_paths(cfg.unet)[target.unet_path]


def command(name: str, lora: Path, out: Path) -> list:
    """The CLI arguments that make `name` read `lora` and write under `out`."""
    return {
        "convert": ["convert", lora, out / "converted.safetensors", "--to", "kohya", "--model", "tiny-sdxl"],
        "merge": ["merge", lora.parent / "base.safetensors", lora, out / "merged.safetensors"],
        "resize": ["resize", lora, out / "resized.safetensors", "--rank", "2", "--model", "tiny-sdxl"],
        "sample": ["sample", "--model", "tiny-sdxl", "--prompt", f"x <lora:{lora.stem}:1>", "--lora-dir", lora.parent,
                   "--steps", "2", "--sampler", "euler", "--seed", "0", "--width", "64", "--height", "64",
                   "--out", out / "samples"],
    }[name]


def assert_refused(inputs: Path, out: Path, name: str, stem: str, module: str, tensor: str) -> None:
    """`name` on inputs/<stem>.safetensors: exit 2, one line naming the file, module and tensor; nothing written or changed.

    NaN in an up weight goes through a real `python cli.py` process; the other cases call the same main in-process."""
    lora = inputs / f"{stem}.safetensors"
    before = snapshot(inputs)
    args = command(name, lora, out)
    proc = gesso_cli(*args, cwd=out) if stem == "nan_up" else gesso_main(*args)
    assert_one_line_error(proc, lora, f"module {module} holds NaN/Inf values ({tensor}:")
    assert_unchanged(before)
    assert snapshot(out) == {} and temp_litter(inputs) == []


# every command against each spoiled UNet tensor: lora_up, lora_down, alpha
@pytest.mark.slow
@pytest.mark.parametrize("name", ["convert", "merge", "resize", "sample"])
@pytest.mark.parametrize("stem", ["nan_up", "inf_down", "nan_alpha"])
def test_spoiled_unet_module_is_refused(inputs, tmp_path, name, stem):
    _, _, module, tensor = SPOILED[stem]
    assert_refused(inputs, tmp_path, name, stem, module, tensor)


# merge bakes text-encoder modules (here a q row slice of OpenCLIP); sample applies none but the file is as broken
@pytest.mark.parametrize("name", ["merge", "sample"])
def test_spoiled_text_encoder_module_is_refused(inputs, tmp_path, name):
    _, _, module, tensor = SPOILED["te_nan_up"]
    assert_refused(inputs, tmp_path, name, "te_nan_up", module, tensor)


def test_nan_alpha_from_peft_metadata_is_refused(inputs, tmp_path):
    assert_refused(inputs, tmp_path, "convert", "peft_nan_alpha", f"unet.{peft_path(models.configs.get('tiny-sdxl'))}", "alpha")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convert", "merge", "resize", "sample"])
def test_valid_file_passes(inputs, tmp_path, name):
    before = snapshot(inputs)
    proc = gesso_cli(*command(name, inputs / "good.safetensors", tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert_unchanged(before)
    (written,) = snapshot(tmp_path)
    if name == "sample":
        assert written.suffix == ".png"
    else:
        assert all(torch.isfinite(t).all() for t in load_file(written).values()), f"{written} holds NaN/Inf"
