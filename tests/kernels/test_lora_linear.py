import pytest
import torch

from gesso.kernels.lora_linear import dequantize_weight, dropout_keep_mask, lora_linear, lora_linear_ref

CASES = [
    # (x shape, out, rank)
    ((5, 16), 16, 4),  # minimal
    ((2, 77, 96), 80, 8),  # sequence 77, rows (154) and features not multiples of the blocks
    ((1, 33, 70), 130, 128),  # largest rank, out spans three column tiles
    ((1, 77, 320), 320, 16),  # SDXL level-0 width, one 77-token row block
]


def _inputs(x_shape, out, rank, dtype, device, bias=True):
    K = x_shape[-1]
    x = torch.randn(x_shape, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(out, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(out, device=device, dtype=dtype) if bias else None
    down = (torch.randn(rank, K, device=device) / K**0.5).to(dtype).requires_grad_()
    up = (torch.randn(out, rank, device=device) / rank**0.5).to(dtype).requires_grad_()
    return x, weight, b, down, up


def _grads(y, dy, x, down, up):
    return torch.autograd.grad(y, (x, down, up), dy)


def _run_and_check(assert_parity, x, weight, b, down, up, scale, **kw):
    """Kernel forward and all three gradients against the float64 reference (and torch's own low precision)."""
    ref_kw = {k: v for k, v in kw.items() if k != "dropout_seed"}
    if kw.get("dropout_p", 0.0) > 0:
        ref_kw["dropout_mask"] = dropout_keep_mask(kw["dropout_seed"], x.shape, kw["dropout_p"], x.device)
    y = lora_linear(x, weight, b, down, up, scale, **kw)
    dy = torch.randn_like(y)
    grads = _grads(y, dy, x, down, up)
    y64 = lora_linear_ref(x, weight, b, down, up, scale, upcast=True, **ref_kw)
    grads64 = _grads(y64, dy.double(), x, down, up)
    lowprec = [None] * 4
    if x.dtype in (torch.float16, torch.bfloat16):
        y_lp = lora_linear_ref(x, weight, b, down, up, scale, **ref_kw)
        lowprec = [y_lp, *_grads(y_lp, dy, x, down, up)]
    for name, out, ref, lp in zip(("y", "dx", "d_down", "d_up"), (y, *grads), (y64, *grads64), lowprec):
        assert_parity(name, out, ref, lp)


@pytest.mark.parametrize("x_shape,out,rank", CASES)
def test_fp32_forward_and_grads(x_shape, out, rank, device, assert_parity):
    _run_and_check(assert_parity, *_inputs(x_shape, out, rank, torch.float32, device), scale=0.75)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_shape,out,rank", CASES[1:3])
def test_low_precision_forward_and_grads(x_shape, out, rank, dtype, device, assert_parity):
    _run_and_check(assert_parity, *_inputs(x_shape, out, rank, dtype, device), scale=0.5)


def test_no_bias_and_strided_input(device, assert_parity):
    # a transposed view, as a (B, C, T) activation fed without a copy
    x, weight, _, down, up = _inputs((2, 77, 48), 40, 8, torch.float32, device, bias=False)
    xt = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not xt.is_contiguous()
    _run_and_check(assert_parity, xt, weight, None, down, up, scale=1.0)


# fp8 e4m3 tiles need sm_89 (Ada, Hopper); GESSO_KERNELS=triton would force them onto an older GPU
FP8_GPU = not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not FP8_GPU, reason="fp8 e4m3 kernels need compute capability >= 8.9; auto mode uses the reference")
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_weight_dequantised_in_kernel(per_channel, dtype, device, assert_parity):
    # rows 154, out 80: per-channel scales cross the tile edge
    x, weight, b, down, up = _inputs((2, 77, 96), 80, 8, dtype, device)
    w32 = weight.float()
    amax = w32.abs().amax(dim=1) if per_channel else w32.abs().max()
    w_scale = (amax / 448.0).float()  # 448: largest finite e4m3
    w8 = (w32 / (w_scale[:, None] if per_channel else w_scale)).to(torch.float8_e4m3fn)
    assert (dequantize_weight(w8, w_scale, torch.float32) - w32).abs().max() < 0.07 * w32.abs().max()
    _run_and_check(assert_parity, x, w8, b, down, up, scale=0.5, weight_scale=w_scale)


def test_dropout_matches_reference_with_the_kernels_mask(device, assert_parity):
    x, weight, b, down, up = _inputs((2, 77, 96), 80, 8, torch.float32, device)
    _run_and_check(assert_parity, x, weight, b, down, up, scale=0.5, dropout_p=0.3, dropout_seed=1234)


def test_dropout_mask_statistics_and_seeding(device):
    keep = dropout_keep_mask(7, (300, 200), 0.25, device)
    # 60000 Bernoulli(0.75) draws: std of the mean 0.0018, so 0.01 is > 5 sigma
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert torch.equal(keep, dropout_keep_mask(7, (300, 200), 0.25, device))
    assert not torch.equal(keep, dropout_keep_mask(8, (300, 200), 0.25, device))


def test_preconditions_fail_loudly(device):
    x, weight, b, down, up = _inputs((4, 32), 16, 4, torch.float32, device)
    with pytest.raises(AssertionError, match="freeze the base weight"):
        lora_linear(x, weight.requires_grad_(), b, down, up, 1.0)
    with pytest.raises(AssertionError, match="weight_scale"):
        lora_linear(x, weight.detach().to(torch.float8_e4m3fn), b, down, up, 1.0)


def test_reference_path_saves_only_fp8_codes_for_backward(device):
    # without the kernel (CPUs, GPUs below 8.9) an fp8 base must not keep a dequantised copy for backward
    from gesso.kernels.dispatch import forced

    x, weight, b, down, up = _inputs((2, 77, 96), 80, 8, torch.float32, device)
    w_scale = weight.abs().amax(dim=1) / 448.0
    w8 = (weight / w_scale[:, None]).to(torch.float8_e4m3fn)
    saved = []
    with forced("reference"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear(x, w8, b, down, up, 0.5, weight_scale=w_scale)
    weight_sized = [t.dtype for t in saved if t.shape == weight.shape]
    assert weight_sized == [torch.float8_e4m3fn], weight_sized
    # and the gradients are those of the plain maths on the dequantised weight
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, down, up), dy)
    w = dequantize_weight(w8, w_scale, torch.float32)
    want = torch.autograd.grad(torch.nn.functional.linear(x, w, b) + 0.5 * (x @ down.t()) @ up.t(), (x, down, up), dy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_follows_autocast_like_f_linear(device):
    # an autograd Function is invisible to autocast: the kernel must cast as F.linear would (an fp32
    # LayerNorm output under CUDA autocast would otherwise run the whole LoRA linear in fp32)
    x, weight, b, down, up = _inputs((2, 77, 96), 80, 8, torch.float32, device)
    weight = weight.to(torch.bfloat16)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        y = lora_linear(x, weight, b, down, up, 0.5)
        assert torch.nn.functional.linear(x, weight).dtype == torch.bfloat16  # what autocast does to torch's own
    assert y.dtype == torch.bfloat16
    bf = [t.to(torch.bfloat16) for t in (x, b, down, up)]
    torch.testing.assert_close(y, lora_linear(bf[0], weight, bf[1], bf[2], bf[3], 0.5), rtol=0, atol=0)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and down.grad.dtype == torch.float32
