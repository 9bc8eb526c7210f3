"""`inspect`: header-only, exact counts, and exit codes 0 (match), 1 (keys differ), 2 (not a checkpoint/LoRA)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gesso import models
from gesso.commands.inspect import inspect_main
from gesso.models import files


@pytest.fixture(scope="module")
def fp16_state():
    state = models.build("tiny-sdxl", seed=5).state_dict()
    return {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}


def run(path, capsys) -> tuple[int, str, str]:
    code = inspect_main(path)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_checkpoint_report_reads_no_tensor_data(tmp_path, fp16_state, capsys, monkeypatch):
    save_file(fp16_state | {"betas": torch.rand(1000)}, tmp_path / "m.safetensors")
    monkeypatch.setattr(files, "safe_open", lambda *a, **k: pytest.fail("tensor data read"))
    code, out, _ = run(tmp_path / "m.safetensors", capsys)
    assert code == 0
    te2 = models.build("tiny-sdxl").text_encoders[1]
    n_te2 = sum(p.numel() for p in te2.parameters())
    assert "architecture: sdxl (engine config 'tiny-sdxl')" in out
    assert f"text_encoder_2 (OpenCLIP bigG)" in out and f"{n_te2:,}  float16" in out
    assert "8,302,148  float16" in out  # the tiny UNet's parameter count
    assert "ignored (1): betas" in out
    assert "keys: all match" in out


def test_mismatching_keys_exit_1_and_are_listed(tmp_path, fp16_state, capsys):
    state = dict(fp16_state)
    del state["model.diffusion_model.out.2.bias"]
    state["model.diffusion_model.out.3.weight"] = torch.zeros(1)
    state["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    save_file(state, tmp_path / "m.safetensors")
    code, out, _ = run(tmp_path / "m.safetensors", capsys)
    assert code == 1
    assert "missing (1):\n    model.diffusion_model.out.2.bias" in out
    assert "unexpected (1):\n    model.diffusion_model.out.3.weight" in out
    assert "first_stage_model.quant_conv.weight: file (8, 8, 3, 3) vs engine (8, 8, 1, 1)" in out


def test_lora_report(tmp_path, capsys):
    unet = "lora_unet_input_blocks_4_1_transformer_blocks_0_"
    lora = {}
    for module, (i, o) in {unet + "attn1_to_q": (64, 64), unet + "ff_net_2": (256, 64),
                           "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32)}.items():
        lora |= {f"{module}.lora_down.weight": torch.randn(8, i), f"{module}.lora_up.weight": torch.zeros(o, 8),
                 f"{module}.alpha": torch.tensor(4.0)}
    metadata = {"ss_network_dim": "8", "ss_network_alpha": "4", "ss_base_model_version": "sdxl_base_v1-0",
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                "ss_tag_frequency": json.dumps({"img": {f"tag{i}": i for i in range(100)}})}
    save_file(lora, tmp_path / "l.safetensors", metadata=metadata)
    code, out, _ = run(tmp_path / "l.safetensors", capsys)
    assert code == 0
    assert "LoRA, 3 modules, 9 tensors" in out
    assert "rank: {8: 3}  alpha: {4.0: 3}" in out
    assert "targets: {'lora_te1': 1, 'lora_unet': 2}" in out or "targets: {'lora_unet': 2, 'lora_te1': 1}" in out
    assert "modelspec.architecture = stable-diffusion-xl-v1-base/lora" in out
    assert "ss_tag_frequency = {" in out and "..." in out  # long values shortened
    assert "module names: all match the engine's sdxl model" in out

    save_file(lora | {"lora_unet_not_a_module.lora_down.weight": torch.zeros(8, 4)}, tmp_path / "bad.safetensors",
              metadata=metadata)
    code, out, _ = run(tmp_path / "bad.safetensors", capsys)
    assert code == 1 and "lora_unet_not_a_module" in out


def test_unreadable_files_exit_2_with_one_line(tmp_path, fp16_state, capsys):
    save_file(fp16_state, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    (tmp_path / "readme.txt").write_text("not a model")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}, tmp_path / "flux.safetensors")
    for name in ("cut.safetensors", "readme.txt", "flux.safetensors", "absent.safetensors"):
        code, out, err = run(tmp_path / name, capsys)
        assert code == 2 and out == "", name
        assert err.startswith("error: ") and err.count("\n") == 1 and name in err


def test_diffusers_folder_is_inspected_from_headers(tmp_path, capsys):
    from models_testutil import write_diffusers_folder

    write_diffusers_folder(models.build("tiny-sd15"), tmp_path / "pipe")
    code, out, _ = run(tmp_path / "pipe", capsys)
    assert code == 0
    assert "format: diffusers" in out and "architecture: sd15 (engine config 'tiny-sd15')" in out


def sparse_checkpoint(path, state: dict) -> int:
    """A full-size safetensors file whose data section is a hole: a real header over ~7 GB that uses no disk."""
    header, offset = {}, 0
    for key, value in state.items():
        dtype, size = ("I64", 8) if value.dtype == torch.int64 else ("F16", 2)
        end = offset + value.numel() * size
        header[key] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def bytes_read() -> int:
    """What this process has read through read() so far (Linux's /proc/self/io `rchar`, page cache hits included)."""
    line = next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar:"))
    return int(line.split()[1])


def test_full_size_sdxl_header_reads_only_the_header(tmp_path, capsys, monkeypatch):
    state = models.build("sdxl", device="meta").state_dict()
    data_bytes = sparse_checkpoint(tmp_path / "sd_xl_base.safetensors", state)
    assert data_bytes > 6.9e9
    monkeypatch.setattr(files, "safe_open", lambda *a, **k: pytest.fail("tensor data read"))
    before = bytes_read()
    code, out, _ = run(tmp_path / "sd_xl_base.safetensors", capsys)
    read = bytes_read() - before
    header = (tmp_path / "sd_xl_base.safetensors").stat().st_size - data_bytes
    # the header (0.4 MB; 0.8 MB read in all, measured) and not the 7 GB of data: counted in bytes, not seconds,
    # which would say as much about the machine as about the reading
    assert read < 16 * 2**20, f"read {read:,} bytes; the header is {header:,}"
    assert code == 0
    assert "2515 tensors" in out and "architecture: sdxl (engine config 'sdxl')" in out
    for count in ("1680   2,567,463,684  float16", "248      83,653,863  float16", "197     123,060,480  float16",
                  "390     694,659,840  float16"):
        assert count in out
