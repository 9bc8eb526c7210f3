"""Kernel tests: Triton kernels against their references, on the GPU or through Triton's interpreter on CPU.

TRITON_INTERPRET=1 works only when set before `triton.language` is imported: `triton.jit` picks
interpreter or compiler when a function is decorated, triton's own `tl.sum`/`tl.rand` included. When no
GPU is present and something imported triton first (engine and model tests import the kernels), the
kernel tests cannot run in this process, so test_in_subprocess.py re-runs this folder in a fresh one.
"""
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() and "triton.language" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import triton.language as tl  # noqa: E402  (after the switch above, on purpose)

HERE = Path(__file__).parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = type(tl.sum).__name__ == "InterpretedFunction"
KERNELS_RUN_HERE = torch.cuda.is_available() or INTERPRETED

if KERNELS_RUN_HERE:
    collect_ignore = ["test_in_subprocess.py"]
    if not torch.cuda.is_available():
        collect_ignore.append("test_tiles.py")  # every autotune tile, forced in turn: GPU only (one tile when interpreted)
else:
    collect_ignore = [p.name for p in HERE.glob("test_*.py") if p.name != "test_in_subprocess.py"]


def _patch_interpreter_bf16_dot():
    """Triton 3.9's interpreter keeps bf16 as raw uint16 and multiplies the bit patterns in tl.dot.

    Upcasting bf16 operands to fp32 first is exact (a bf16 product fits in fp32) and is what a tensor
    core does with fp32 accumulation, so the kernels' bf16 paths are checked as they run on a GPU.
    """
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot
    if getattr(original, "gesso_bf16_patch", False):
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot.gesso_bf16_patch = True
    interpreter.InterpreterBuilder.create_dot = create_dot


if INTERPRETED:
    _patch_interpreter_bf16_dot()


@pytest.fixture(autouse=True)
def _seed_and_force_triton(request, monkeypatch):
    """A different, reproducible seed per test; the public entry points take the Triton path."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    monkeypatch.setenv("GESSO_KERNELS", "triton")


@pytest.fixture
def device():
    return DEVICE


def _max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


@pytest.fixture
def assert_parity():
    """Compare a kernel output with the float64 reference.

    fp32: allclose, rtol 1e-5 and atol 1e-5 * max|ref|: fp32 eps is 1.2e-7 and the reductions here
    sum at most a few hundred terms, so accumulated rounding stays near 100 eps of the largest value.
    bf16/fp16 (STYLE.md): max|kernel - ref64| <= 2 * max|torch_lowprec - ref64| + atol, where
    torch_lowprec is PyTorch's own low-precision result and atol = eps(dtype) * max|ref64|, one unit
    in the last place at the largest element: the rounding of the stored result, paid once by any
    implementation, which a single tie can make the whole of torch's error.
    """

    def check(name, out, ref64, torch_lowprec=None):
        assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
        assert torch.isfinite(out).all(), f"{name}: non-finite values"
        scale = ref64.abs().max().item()
        err = _max_err(out, ref64)
        if out.dtype in (torch.float32, torch.float64):
            tol = 1e-5 * scale
            assert torch.allclose(out.double(), ref64.double(), rtol=1e-5, atol=tol), (
                f"{name}: max err {err:.3g} vs atol {tol:.3g}")
            return
        assert torch_lowprec is not None, f"{name}: low-precision check needs PyTorch's own result"
        tol = 2 * _max_err(torch_lowprec, ref64) + torch.finfo(out.dtype).eps * scale
        assert err <= tol, f"{name}: max err {err:.3g} > {tol:.3g} (torch {out.dtype} err x2 + 1 ulp)"

    return check
