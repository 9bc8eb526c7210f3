"""Flash attention vs torch SDPA and the math reference, forward and forward+backward."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import DEVICE, DTYPE, ON_GPU, gpu_only
from gesso.kernels.attention import attention, attention_ref

# (name, B, heads, Tq, Tk, D); SDXL at 1024x1024, batch 1
GPU_CASES = [
    ("sdxl-640-self", 1, 10, 4096, 4096, 64),
    ("sdxl-1280-self", 1, 20, 1024, 1024, 64),
    ("sdxl-640-cross77", 1, 10, 4096, 77, 64),
    ("sdxl-1280-cross77", 1, 20, 1024, 77, 64),
    ("sd15-level0-d40", 1, 8, 4096, 4096, 40),
]
CPU_CASES = [("smoke-self", 1, 2, 256, 256, 64), ("smoke-cross77", 1, 2, 256, 77, 64)]
IMPLS = {
    "gesso-triton": attention,
    "torch-sdpa": F.scaled_dot_product_attention,
    "torch-math-ref": lambda q, k, v: attention_ref(q, k, v, upcast=False),
}


def operands(B, H, Tq, Tk, D, backward, device=DEVICE, dtype=DTYPE):
    """q (B, H, Tq, D), k and v (B, H, Tk, D), requiring grads when the case times the backward, and dO like q."""
    q = torch.randn(B, H, Tq, D, device=device, dtype=dtype, requires_grad=backward)
    k = torch.randn(B, H, Tk, D, device=device, dtype=dtype, requires_grad=backward)
    v = torch.randn(B, H, Tk, D, device=device, dtype=dtype, requires_grad=backward)
    return q, k, v, torch.randn(B, H, Tq, D, device=device, dtype=dtype)


@pytest.mark.parametrize("impl", [gpu_only("gesso-triton"), "torch-sdpa", "torch-math-ref"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", GPU_CASES if ON_GPU else CPU_CASES, ids=lambda c: c[0])
def bench_attention(benchmark, case, backward, impl):
    name, B, H, Tq, Tk, D = case
    q, k, v, do = operands(B, H, Tq, Tk, D, backward)
    fn = IMPLS[impl]

    def step():
        o = fn(q, k, v)
        if backward:
            torch.autograd.grad(o, (q, k, v), do)

    # useful FLOPs: QK^T and PV forward (4 BHTqTkD); dV, dP, dS K, dS^T Q backward (8); recompute not counted
    flops = (12 if backward else 4) * B * H * Tq * Tk * D
    harness.run(benchmark, "attention", f"{name}-{'fwd+bwd' if backward else 'fwd'}", impl, step, flops=flops)
