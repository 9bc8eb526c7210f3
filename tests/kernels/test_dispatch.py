import pytest
import torch

from gesso.kernels import dispatch


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
