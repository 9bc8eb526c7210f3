"""The kernel benchmarks compare like with like: at each of their CPU cases, every implementation a case times gives
the float64 reference's output and gradients (the Triton kernels through the interpreter), and every optimizer the
AdamW benchmark times makes the same first step. The benchmarks are timings and pytest does not collect them
(pytest.ini); this is what CI checks of them, on their own operands and call."""
import pytest
import torch

from benchmarks import bench_adamw8bit, bench_attention, bench_lora_linear
from gesso.kernels import dispatch
from gesso.kernels.adamw8bit import MIN_8BIT_SIZE
from gesso.kernels.attention import attention_ref
from gesso.kernels.lora_linear import lora_linear_ref

# on a GPU, python -m benchmarks.run times the kernels themselves at SDXL's shapes
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU cases, kernels interpreted")


def assert_close(name: str, got: torch.Tensor, ref64: torch.Tensor, rtol: float = 1e-5) -> None:
    """fp32 against float64, within rtol of the largest reference value (tests/kernels' fp32 rule)."""
    tol = rtol * ref64.abs().max().item()
    err = (got.double() - ref64).abs().max().item()
    assert got.shape == ref64.shape and err <= tol, f"{name}: shape {tuple(got.shape)}, max err {err:.3g} > {tol:.3g}"


def float64(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("case", bench_attention.CPU_CASES, ids=lambda c: c[0])
def test_every_attention_impl_gives_the_reference(case):
    _, B, H, Tq, Tk, D = case
    q, k, v, do = bench_attention.operands(B, H, Tq, Tk, D, backward=True, device="cpu", dtype=torch.float32)
    q64, k64, v64 = float64(q, k, v)
    o64 = attention_ref(q64, k64, v64, upcast=False)
    want = (o64, *torch.autograd.grad(o64, (q64, k64, v64), do.double()))
    with dispatch.forced("triton"):  # the gesso-triton impl takes its kernel even on CPU tensors
        for impl, fn in bench_attention.IMPLS.items():
            o = fn(q, k, v)
            got = (o, *torch.autograd.grad(o, (q, k, v), do))
            for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
                assert_close(f"{impl} {name}", g, w)


@pytest.mark.parametrize("rank", [16, 64])  # the benchmark's ranks
@pytest.mark.parametrize("case", bench_lora_linear.CPU_CASES, ids=lambda c: c[0])
def test_every_lora_linear_impl_gives_the_reference(case, rank):
    _, M, K, N = case
    x, weight, scale, bias, down, up = bench_lora_linear.operands(M, K, N, rank, fp8=False, device="cpu",
                                                                  dtype=torch.float32)
    dy = torch.randn(M, N)
    x64, w64, b64, down64, up64 = float64(x, weight, bias, down, up)
    y64 = lora_linear_ref(x64, w64, b64, down64, up64, 0.5)
    want = (y64, *torch.autograd.grad(y64, (x64, down64, up64), dy.double()))
    with dispatch.forced("triton"):
        for impl in bench_lora_linear.IMPLS:
            y = bench_lora_linear.forward(impl, x, weight, scale, bias, down, up)
            got = (y, *torch.autograd.grad(y, (x, down, up), dy))
            for name, g, w in zip(("out", "dx", "d_down", "d_up"), got, want):
                assert_close(f"{impl} {name}", g, w)


def test_every_adamw_impl_makes_the_same_first_step():
    # the CPU case's rank 4, one transformer block at a quarter of SDXL's widths: its GEGLU up (1280, 4) is over
    # MIN_8BIT_SIZE and takes the 8-bit kernel (at the CPU case's 1/16 every tensor keeps fp32 moments)
    shapes = bench_adamw8bit.sdxl_lora_shapes(4, scale=4)[:20]
    big = [i for i, s in enumerate(shapes) if s[0] * s[1] >= MIN_8BIT_SIZE]
    assert 0 < len(big) < len(shapes)
    start = [torch.randn(s) * 0.02 for s in shapes]
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    ref = [p.double() for p in start]
    for p, g in zip(ref, grads):
        p.grad = g.double()
    torch.optim.AdamW(ref, lr=1e-4).step()  # the benchmark's lr, torch's defaults, in float64
    # bitsandbytes' optimizer needs CUDA: the benchmark times it on a GPU only
    impls = {name: make for name, make in bench_adamw8bit.OPTIMIZERS.items() if name != "bnb-adamw8bit"}
    assert "gesso-adamw8bit" in impls and len(impls) >= 2
    with dispatch.forced("triton"):
        for impl, make in impls.items():
            params = [p.clone() for p in start]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt = make(params)
            opt.step()
            if impl == "gesso-adamw8bit":
                assert all("m_code" in opt.state[params[i]] for i in big)
            for i, (p, p0, r) in enumerate(zip(params, start, ref)):
                # the step (about lr = 1e-4) against float64's, to 0.1% of its largest element: a wrong bias
                # correction or decay is off by far more, fp32's rounding of the parameters by ~2e-9
                assert_close(f"{impl} tensor {i} {tuple(p.shape)}", p - p0, r - p0.double(), rtol=1e-3)
