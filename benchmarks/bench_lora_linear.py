"""Fused LoRA linear vs the same maths as torch matmuls (F.linear x3), forward and forward+backward."""
import pytest
import torch

from benchmarks import harness
from benchmarks.harness import DEVICE, DTYPE, ON_GPU, gpu_only
from gesso.kernels.lora_linear import lora_linear, lora_linear_ref

# (name, rows M, in, out); SDXL at 1024x1024, batch 1: 4096 tokens at 640 channels, 1024 at 1280
GPU_CASES = [
    ("640-attn-proj", 4096, 640, 640),
    ("640-ff-in", 4096, 640, 5120),
    ("640-ff-out", 4096, 2560, 640),
    ("640-cross-kv", 77, 2048, 640),
    ("1280-attn-proj", 1024, 1280, 1280),
    ("1280-ff-in", 1024, 1280, 10240),
    ("1280-ff-out", 1024, 5120, 1280),
    ("1280-cross-kv", 77, 2048, 1280),
]
CPU_CASES = [("smoke-proj", 256, 64, 64), ("smoke-ff-in", 256, 64, 512)]
IMPLS = {"gesso-triton": lora_linear, "torch-matmuls": lora_linear_ref}


def operands(M, K, N, rank, fp8, device=DEVICE, dtype=DTYPE):
    """x (M, K), weight (N, K) (fp8 with its per-channel scale, or None), bias, down (rank, K), up (N, rank)."""
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    scale = None
    if fp8:
        scale = weight.float().abs().amax(dim=1) / 448.0  # per output channel
        weight = (weight.float() / scale[:, None]).to(torch.float8_e4m3fn)
    bias = torch.randn(N, device=device, dtype=dtype)
    down = (torch.randn(rank, K, device=device, dtype=dtype) / K**0.5).requires_grad_()
    up = torch.randn(N, rank, device=device, dtype=dtype).requires_grad_()
    return x, weight, scale, bias, down, up


def forward(impl, x, weight, scale, bias, down, up):
    """What every case times (then its backward, in the fwd+bwd cases): `impl` on the case's operands."""
    return IMPLS[impl](x, weight, bias, down, up, 0.5, weight_scale=scale)


@pytest.mark.parametrize("impl", [gpu_only("gesso-triton"), "torch-matmuls"])
@pytest.mark.parametrize("fp8", [False, pytest.param(True, marks=pytest.mark.skipif(not ON_GPU, reason="GPU only"))],
                         ids=["w-act-dtype", "w-fp8"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("case", GPU_CASES if ON_GPU else CPU_CASES, ids=lambda c: c[0])
def bench_lora_linear(benchmark, case, rank, backward, fp8, impl):
    name, M, K, N = case
    x, weight, scale, bias, down, up = operands(M, K, N, rank, fp8)
    dy = torch.randn(M, N, device=DEVICE, dtype=DTYPE)

    def step():
        y = forward(impl, x, weight, scale, bias, down, up)
        if backward:
            torch.autograd.grad(y, (x, down, up), dy)

    # forward x W^T, (x A^T), (.) B^T; backward dy W, dy B, (dy B) A, d_down, d_up: 2 FLOPs per MAC
    fwd = 2 * M * (K * N + K * rank + rank * N)
    bwd = 2 * M * (N * K + N * rank + rank * K + rank * K + N * rank)
    tag = f"{name}-r{rank}-{'fwd+bwd' if backward else 'fwd'}-{'wfp8' if fp8 else 'w-act-dtype'}"
    harness.run(benchmark, "lora_linear", tag, impl, step, flops=fwd + (bwd if backward else 0))
