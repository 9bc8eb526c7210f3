import json
from types import SimpleNamespace

import pytest
import torch

from gesso.kernels import dispatch
from gesso.kernels.attention import attention
from gesso.kernels.lora_linear import lora_linear


@pytest.mark.parametrize("mode,expected", [("triton", True), ("reference", False), ("auto", False)])
def test_env_var_forces_either_path_for_cpu_tensors(mode, expected, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, mode)
    assert dispatch.use_triton(torch.randn(3)) is expected


def test_auto_is_the_default(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert dispatch.kernel_mode() == "auto"
    assert dispatch.use_triton(torch.randn(3)) is False  # CPU tensors take the reference


def test_unknown_mode_is_an_error(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="GESSO_KERNELS"):
        dispatch.use_triton(torch.randn(3))


def test_old_gpus_fall_back_with_one_notice(monkeypatch, capsys):
    # a pre-Ampere GPU (capability 7.5) without touching a real one
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(dispatch, "_noticed", set())
    device = torch.device("cuda", 0)
    assert dispatch._capable(device) is False
    assert dispatch._capable(device) is False
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "7.5 < 8.0" in lines[0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 6))
    assert dispatch._capable(torch.device("cuda", 1)) is True
    assert dispatch._capable(torch.device("cuda", 1), (8, 9)) is False  # fp8 weights want sm_89
    assert "8.6 < 8.9" in capsys.readouterr().err


def _cuda_operand(dtype=torch.bfloat16):
    """Something with a CUDA device and a dtype, for the dispatch's checks only: no GPU is touched."""
    return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype)


def _table(tmp_path, monkeypatch, devices) -> None:
    path = tmp_path / "dispatch_table.json"
    path.write_text(json.dumps({"devices": devices}))
    monkeypatch.setattr(dispatch, "TABLE", path)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(dispatch, "_device_name", lambda index: "NVIDIA H200")


def test_table_sends_a_slower_shape_to_the_reference(tmp_path, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x, w, b, down, up = (torch.randn(2, 77, 96), torch.randn(80, 96), None, torch.randn(8, 96), torch.randn(80, 8))
    with dispatch.recorded() as seen, dispatch.forced("reference"):
        lora_linear(x, w, b, down, up, 1.0)
        attention(torch.randn(1, 2, 50, 40), torch.randn(1, 2, 77, 40), torch.randn(1, 2, 77, 40))
    lin_key, attn_key = "154-80-96-8-float32-float32", "1-2-50-40-77-float32"
    assert seen == {("lora_linear", lin_key), ("attention", attn_key)}
    row = {"use": "reference", "triton_ms": 0.2, "reference_ms": 0.1}
    _table(tmp_path, monkeypatch, {"NVIDIA H200": {"ops": {"lora_linear": {lin_key: row}}},
                                   "NVIDIA H100 80GB HBM3": {"ops": {"attention": {attn_key: row}}}})
    gpu = _cuda_operand()
    assert dispatch.use_triton(gpu, op="lora_linear", key=lin_key) is False  # measured slower here: reference
    assert dispatch.use_triton(gpu, op="lora_linear", key="4096-640-640-16-bfloat16-bfloat16") is True  # unmeasured
    assert dispatch.use_triton(gpu, op="attention", key=attn_key) is True  # measured on another GPU only
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.use_triton(gpu, op="lora_linear", key=lin_key) is True  # a forced mode overrides the table


def test_fp32_matmul_kernels_take_cublas_unless_the_table_measured_the_kernel_faster(tmp_path, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    faster = {"use": "triton", "triton_ms": 0.1, "reference_ms": 0.2}
    _table(tmp_path, monkeypatch, {"NVIDIA H200": {"ops": {"lora_linear": {"4096-640-640-16-float32-float32": faster}}}})
    fp32, bf16 = _cuda_operand(torch.float32), _cuda_operand(torch.bfloat16)
    assert dispatch.use_triton(fp32, op="lora_linear", key="1024-1280-1280-16-float32-float32") is False  # cuBLAS
    assert dispatch.use_triton(fp32, op="attention", key="1-10-4096-64-4096-float32") is False
    assert dispatch.use_triton(fp32, op="lora_linear", key="4096-640-640-16-float32-float32") is True  # measured faster
    assert dispatch.use_triton(bf16, op="lora_linear", key="1024-1280-1280-16-bfloat16-bfloat16") is True
    assert dispatch.use_triton(fp32, op="adamw8bit") is True  # elementwise, no dots: fp32 LoRA weights are its case


def test_a_malformed_table_names_its_file(tmp_path, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    _table(tmp_path, monkeypatch, {"NVIDIA H200": {"ops": {"attention": {"1-2-3-64-3-bfloat16": {"use": "cuda"}}}}})
    with pytest.raises(ValueError, match="dispatch_table.json: not a dispatch table"):
        dispatch.use_triton(_cuda_operand(), op="attention", key="1-2-3-64-3-bfloat16")


def assert_measured_choices(devices: dict) -> None:
    """Each device's entry says when it was measured; each row carries both timings and picks the faster. A table
    without a single measured row is no table: it fails."""
    rows = [(device, op, key, row) for device, entry in devices.items() for op, by_key in entry["ops"].items()
            for key, row in by_key.items()]
    assert rows, "a dispatch table without a measured row"
    for device, entry in devices.items():
        assert entry["measured"]["date"] and entry["measured"]["torch"], device
    for device, op, key, row in rows:
        assert row["triton_ms"] > 0 and row["reference_ms"] > 0, (device, op, key)
        faster = "reference" if row["reference_ms"] < row["triton_ms"] else "triton"
        assert row["use"] == faster, (device, op, key, row)


def test_committed_table_holds_only_measured_choices():
    # the table is written by a GPU session from its timings (benchmarks/dispatch_table.py)
    if not dispatch.TABLE.is_file():
        pytest.skip(f"no {dispatch.TABLE.name} committed: no GPU session has written one yet")
    assert_measured_choices(dispatch.load_table())


def test_the_table_check_passes_a_measured_table_and_fails_an_empty_or_wrong_one(tmp_path, monkeypatch):
    measured = {"date": "2026-12-01", "torch": "2.13.0"}

    def h200(row: dict | None, when: dict = measured) -> dict:
        rows = {"1-10-4096-64-4096-bfloat16": row} if row else {}
        return {"NVIDIA H200": {"measured": when, "ops": {"attention": rows}}}

    tables = {
        "measured": h200({"use": "triton", "triton_ms": 0.5, "reference_ms": 0.9}),
        "no devices": {},
        "no rows": h200(None),
        "the slower path": h200({"use": "reference", "triton_ms": 0.5, "reference_ms": 0.9}),
        "no date": h200({"use": "triton", "triton_ms": 0.5, "reference_ms": 0.9}, {"torch": "2.13.0"}),
    }
    for name, devices in tables.items():
        (tmp_path / name).mkdir()
        _table(tmp_path / name, monkeypatch, devices)  # written as a GPU session would, read back as dispatch does
        if name == "measured":
            assert_measured_choices(dispatch.load_table())
        else:
            with pytest.raises((AssertionError, KeyError)):
                assert_measured_choices(dispatch.load_table())
