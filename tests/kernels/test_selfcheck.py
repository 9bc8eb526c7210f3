"""The first-use self-check (kernels/selfcheck.py): each kernel a run will take, against its reference at small
shapes in the run's dtypes, before training; a verdict per kernel and shape class, cached, and a kernel that disagrees
or fails turned off with one line. Run here on the CPU through the interpreter, for a stub GPU's verdicts."""
from types import SimpleNamespace

import pytest
import torch

from gesso.kernels import adamw8bit as opt8
from gesso.kernels import attention as attn
from gesso.kernels import device as gpus
from gesso.kernels import dispatch, fallback, selfcheck
from test_fallback import ERRORS, Failing

@pytest.fixture
def store(monkeypatch, tmp_path):
    """`auto` dispatch sending CPU tensors to the kernels, and the verdicts of a stub RTX 4090 in a fresh cache."""
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    monkeypatch.setattr(dispatch, "_auto_kernel", lambda *args: True)
    monkeypatch.setattr(fallback, "_switched", set())
    props = SimpleNamespace(name="NVIDIA GeForce RTX 4090", major=8, minor=9, shared_memory_per_block_optin=101376,
                            total_memory=24 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
    gpus._gpu.cache_clear()
    verdicts = fallback.Verdicts(gpus._gpu(0), tmp_path / fallback.VERDICTS_FILE)
    monkeypatch.setattr(fallback, "verdicts", lambda device: verdicts)
    yield verdicts
    gpus._gpu.cache_clear()


@pytest.fixture
def preflight(device):
    """The self-check of an fp32 run with AdamW8bit, rank 8 and head dims 40, 64 and 512, on this test's device."""
    def run(**kw):
        selfcheck.preflight(torch.device(device), torch.float32,
                            **{"fp8_base": False, "adamw8bit": True, "rank": 8, "head_dims": (40, 64, 512), **kw})
    return run


def test_the_first_run_checks_each_kernel_once_and_later_runs_skip_it(store, preflight, monkeypatch, capsys):
    preflight()
    out = capsys.readouterr()
    assert "compiling kernels for NVIDIA GeForce RTX 4090 (first run only)" in out.err
    uses = {(op, cls): v["use"] for op, classes in store.ops.items() for cls, v in classes.items()}
    # 40 and 64 share the padded class 64 (checked once, at 40); 512 takes torch's SDPA, never the kernel
    assert uses == {("lora_linear", "float32 x, float32 W, rank<=16"): "triton", ("attention", "float32, head dim<=64"): "triton",
                    ("adamw8bit", "float32"): "triton"}
    assert all("agrees with its reference" in v["why"] or "codes at most" in v["why"] for c in store.ops.values() for v in c.values())
    again = fallback.Verdicts(store.gpu, store.path)  # the next run reads them back
    monkeypatch.setattr(fallback, "verdicts", lambda device: again)
    monkeypatch.setattr(selfcheck, "lora_check", lambda *a: pytest.fail("checked again"))
    preflight()
    assert again.found and capsys.readouterr().err == ""


def test_a_kernel_that_disagrees_is_turned_off_with_one_line(store, preflight, device, monkeypatch, capsys):
    real = attn._forward
    monkeypatch.setattr(attn, "_forward", lambda q, k, v: (lambda o, lse: (o * 1.001, lse))(*real(q, k, v)))
    preflight(adamw8bit=False)
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gesso: warning")]
    assert "Triton kernel attention (float32, head dim<=64)" in line and "disagrees with its reference: o max err" in line
    assert store.use("attention", "float32, head dim<=64") == "reference"
    assert store.use("lora_linear", "float32 x, float32 W, rank<=16") == "triton"
    q = torch.randn(1, 2, 9, 64, device=device)
    assert torch.equal(attn.attention(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q))  # SDPA now


def test_a_kernel_that_fails_in_the_check_is_turned_off(store, preflight, monkeypatch, capsys):
    monkeypatch.setattr(opt8, "_adamw8bit_kernel", Failing(ERRORS["OutOfResources"]()))
    preflight(head_dims=())
    assert store.use("adamw8bit", "float32") == "reference"
    assert store.ops["adamw8bit"]["float32"]["why"].startswith("OutOfResources: out of resource: shared memory")
    assert "Triton kernel adamw8bit (float32) cannot run" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_a_forced_mode_checks_nothing(mode, store, preflight, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, mode)
    monkeypatch.setattr(selfcheck, "lora_check", lambda *a: pytest.fail("checked under a forced mode"))
    preflight()
    assert store.ops == {}
