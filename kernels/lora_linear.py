"""Frozen linear plus low-rank update: y = x W^T + b + scale * (dropout(x) A^T) B^T, forward and backward.

Fused: one pass over x feeds both the frozen matmul and the rank-r path (the (M, r) product stays in
registers), the frozen weight may be fp8 e4m3 dequantised in-kernel (per-tensor or per-channel scale),
and LoRA dropout is a Philox mask regenerated in the backward instead of stored. The backward's dx pass
reads dy once for dy W and dy B. Fast while x W^T dominates (SDXL linears, in >= 320, ranks <= 128);
the rank-r path costs (r/BLOCK_N) extra MACs per tile, so at very small `out` (< ~4r) cuBLAS wins.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gesso.kernels import fallback, tiles
from gesso.kernels.dispatch import MIN_CAPABILITY, autocast_inputs, shape_key, use_triton
from gesso.kernels.tuning import autotuned

FP8_DTYPES = (torch.float8_e4m3fn,)
FP8_MIN_CAPABILITY = (8, 9)
W_SCALE_NONE, W_SCALE_TENSOR, W_SCALE_CHANNEL = 0, 1, 2


def dequantize_weight(weight, weight_scale, dtype):
    """fp8 (out, ...) weight times its per-tensor () / (1,) or per-channel (out,) scale, in `dtype` (convs too)."""
    if weight_scale is None:
        return weight.to(dtype)
    scale = weight_scale.float().reshape(-1, *[1] * (weight.dim() - 1)) if weight_scale.numel() > 1 else weight_scale.float().reshape(())
    return (weight.float() * scale).to(dtype)


def lora_linear_ref(x, weight, bias, down, up, scale: float, upcast: bool = False, *,
                    weight_scale=None, dropout_p: float = 0.0, dropout_mask=None):
    """x (..., in), weight (out, in), bias (out,) or None, down (r, in), up (out, r).

    dropout_mask: bool keep-mask shaped like x; drawn here with torch when dropout_p > 0 and none is given.
    """
    dtype = x.dtype
    if upcast:
        x, down, up = x.double(), down.double(), up.double()
        bias = None if bias is None else bias.double()
    w = weight.to(x.dtype) if weight_scale is None else None  # fp8 codes are dequantised in FrozenFP8Linear
    lora_scale = scale
    x_lora = x
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(x, dtype=torch.float32) >= dropout_p
        x_lora = x * dropout_mask.to(x.dtype)
        lora_scale = scale / (1.0 - dropout_p)
    down, up = down.to(x.dtype), up.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    base = F.linear(x, w, bias) if weight_scale is None else FrozenFP8Linear.apply(x, weight, weight_scale, bias)
    y = base + lora_scale * F.linear(F.linear(x_lora, down), up)
    return y.to(dtype)


class FrozenFP8Linear(torch.autograd.Function):
    """x W^T + b for fp8 codes W and their scale, dequantised in forward and again in backward.

    F.linear on the dequantised weight would save that full-precision copy for backward: every LoRA
    base's weight twice over at fp8_base, the memory fp8 is there to save. Only the codes are saved here.
    """

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias):
        ctx.save_for_backward(weight, weight_scale)
        return F.linear(x, dequantize_weight(weight, weight_scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        weight, weight_scale = ctx.saved_tensors
        dx = dy @ dequantize_weight(weight, weight_scale, dy.dtype) if ctx.needs_input_grad[0] else None
        d_bias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return dx, None, None, d_bias


@triton.jit
def _keep_mask(seed, offs_m, offs_k, K, dropout_p):
    """Philox keep-mask for rows offs_m (BM,) and input columns offs_k (BK,): same bits in every pass."""
    return tl.rand(seed, offs_m[:, None] * K + offs_k[None, :]) >= dropout_p


@autotuned(tiles.LORA_FWD, tiles.LORA_INTERPRETER, key=["M", "N", "K", "R"], prune=tiles.LORA_FWD_PRUNE)
@triton.jit
def _lora_linear_fwd_kernel(
    # pointers
    x_ptr,  # shape (M, K)
    w_ptr,  # shape (N, K), bf16/fp16/fp32 or fp8 e4m3
    w_scale_ptr,  # shape (1,) or (N,) fp32; unused when W_SCALE == 0
    b_ptr,  # shape (N,); unused without HAS_BIAS
    down_ptr,  # shape (R, K)
    up_ptr,  # shape (N, R)
    y_ptr,  # shape (M, N)
    xa_ptr,  # shape (M, R): (x * keep) down^T, kept for the backward
    # sizes
    M, N, K, R, lora_scale, dropout_p, seed,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_dr, stride_dk,
    stride_un, stride_ur, stride_ym, stride_yn, stride_am, stride_ar,
    # meta
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, W_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m, mask_n, mask_r = offs_m < M, offs_n < N, offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_r = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
        a = tl.load(down_ptr + offs_r[:, None] * stride_dr + offs_k[None, :] * stride_dk,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, offs_m, offs_k, K, dropout_p), x, 0.0).to(x.dtype)
        acc_r += tl.dot(x, tl.trans(a.to(x.dtype)), input_precision=DOT_PRECISION)
    if W_SCALE == 1:
        acc *= tl.load(w_scale_ptr)
    if W_SCALE == 2:
        acc *= tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    xa = acc_r.to(x_ptr.dtype.element_ty)
    u = tl.load(up_ptr + offs_n[:, None] * stride_un + offs_r[None, :] * stride_ur,
                mask=mask_n[:, None] & mask_r[None, :], other=0.0)
    acc += lora_scale * tl.dot(xa, tl.trans(u.to(xa.dtype)), input_precision=DOT_PRECISION)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if pid_n == 0:
        tl.store(xa_ptr + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar,
                 xa, mask=mask_m[:, None] & mask_r[None, :])


@autotuned(tiles.LORA_DX, tiles.LORA_INTERPRETER, key=["M", "N", "K", "R"], prune=tiles.LORA_DX_PRUNE)
@triton.jit
def _lora_linear_bwd_dx_kernel(
    # pointers
    dy_ptr,  # shape (M, N)
    w_ptr,  # shape (N, K)
    w_scale_ptr,  # shape (1,) or (N,) fp32; unused when W_SCALE == 0
    down_ptr,  # shape (R, K)
    up_ptr,  # shape (N, R)
    dx_ptr,  # shape (M, K)
    dyb_ptr,  # shape (M, R): dy up, kept for d_down
    # sizes
    M, N, K, R, lora_scale, dropout_p, seed,
    # strides
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dr, stride_dk,
    stride_un, stride_ur, stride_dxm, stride_dxk, stride_bm, stride_br,
    # meta
    DOT_PRECISION: tl.constexpr,
    W_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m, mask_k, mask_r = offs_m < M, offs_k < K, offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_r = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if W_SCALE == 2:  # the scale runs along the reduction here, so it goes on the tile
            w = w.to(tl.float32) * tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
        acc += tl.dot(dy, w.to(dy.dtype), input_precision=DOT_PRECISION)
        u = tl.load(up_ptr + offs_n[:, None] * stride_un + offs_r[None, :] * stride_ur,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        acc_r += tl.dot(dy, u.to(dy.dtype), input_precision=DOT_PRECISION)
    if W_SCALE == 1:
        acc *= tl.load(w_scale_ptr)
    dyb = acc_r.to(dy_ptr.dtype.element_ty)
    a = tl.load(down_ptr + offs_r[:, None] * stride_dr + offs_k[None, :] * stride_dk,
                mask=mask_r[:, None] & mask_k[None, :], other=0.0)
    lora = tl.dot(dyb, a.to(dyb.dtype), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        lora = tl.where(_keep_mask(seed, offs_m, offs_k, K, dropout_p), lora, 0.0)
    acc += lora_scale * lora
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])
    if pid_k == 0:
        tl.store(dyb_ptr + offs_m[:, None] * stride_bm + offs_r[None, :] * stride_br,
                 dyb, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_linear_bwd_down_kernel(
    # pointers
    dyb_ptr,  # shape (M, R)
    x_ptr,  # shape (M, K)
    part_ptr,  # shape (SPLIT, R, K) fp32 partial sums of dyb^T (x * keep)
    # sizes
    M, K, R, rows_per_split, dropout_p, seed,
    # strides
    stride_bm, stride_br, stride_xm, stride_xk, stride_ps, stride_pr, stride_pk,
    # meta
    DOT_PRECISION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k, mask_r = offs_k < K, offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    row_end = tl.minimum(M, (pid_s + 1) * rows_per_split)
    for m0 in range(pid_s * rows_per_split, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        dyb = tl.load(dyb_ptr + offs_m[:, None] * stride_bm + offs_r[None, :] * stride_br,
                      mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, offs_m, offs_k, K, dropout_p), x, 0.0).to(x.dtype)
        acc += tl.dot(tl.trans(dyb), x.to(dyb.dtype), input_precision=DOT_PRECISION)
    tl.store(part_ptr + pid_s * stride_ps + offs_r[:, None] * stride_pr + offs_k[None, :] * stride_pk,
             acc, mask=mask_r[:, None] & mask_k[None, :])


@triton.jit
def _dropout_keep_kernel(
    # pointers
    keep_ptr,  # shape (M, K) bool as int8
    # sizes
    M, K, dropout_p, seed,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, offs_m, offs_k, K, dropout_p)
    tl.store(keep_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _meta(r: int, dtype) -> dict:
    """The constexprs the tuner does not choose; fp32 inputs (the interpreter tests) get exact fp32 products, not TF32."""
    return dict(BLOCK_R=_block_r(r), DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")


def shape_class(x_dtype, w_dtype, r: int) -> str:
    """The fallback's unit (kernels/fallback.py): one compiled kernel family per dtypes and padded rank."""
    return f"{str(x_dtype).removeprefix('torch.')} x, {str(w_dtype).removeprefix('torch.')} W, rank<={_block_r(r)}"


def _scale_mode(weight, weight_scale) -> int:
    if weight.dtype in FP8_DTYPES:
        assert weight_scale is not None, "fp8 weights need weight_scale: shape () or (1,) per tensor, (out,) per channel"
    if weight_scale is None:
        return W_SCALE_NONE
    assert weight_scale.numel() in (1, weight.shape[0]), (
        f"weight_scale has {weight_scale.numel()} elements; use 1 (per tensor) or out={weight.shape[0]} (per channel)")
    return W_SCALE_TENSOR if weight_scale.numel() == 1 else W_SCALE_CHANNEL


def _check(x2, weight, bias, down, up):
    M, K = x2.shape
    R = down.shape[0]
    assert weight.dim() == 2 and weight.shape[1] == K, f"weight {tuple(weight.shape)} must be (out, {K})"
    assert down.shape == (R, K), f"down {tuple(down.shape)} must be (r, {K})"
    assert up.shape == (weight.shape[0], R), f"up {tuple(up.shape)} must be ({weight.shape[0]}, {R})"
    assert 1 <= R <= 128, f"rank {R} is outside 1..128; use lora_linear_ref for larger ranks"
    assert bias is None or bias.shape == (weight.shape[0],), "bias must be (out,)"
    assert x2.dtype in (torch.float16, torch.bfloat16, torch.float32), f"x dtype {x2.dtype} unsupported"
    devices = {t.device for t in (x2, weight, down, up) if t is not None}
    assert len(devices) == 1, f"all operands must be on one device, got {devices}"


def _forward(x2, weight, weight_scale, bias, down, up, lora_scale, dropout_p, seed):
    """x2 (M, K) -> y (M, N), xa (M, R)."""
    _check(x2, weight, bias, down, up)
    (M, K), N, R = x2.shape, weight.shape[0], down.shape[0]
    mode = _scale_mode(weight, weight_scale)
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    xa = torch.empty((M, R), device=x2.device, dtype=x2.dtype)
    w_scale = weight_scale.float().reshape(-1).contiguous() if mode else y
    meta = _meta(R, x2.dtype)
    grid = lambda tile: (triton.cdiv(M, tile["BLOCK_M"]), triton.cdiv(N, tile["BLOCK_N"]))  # noqa: E731
    _lora_linear_fwd_kernel[grid](
        x2, weight, w_scale, bias if bias is not None else y, down, up, y, xa,
        M, N, K, R, lora_scale, dropout_p, seed,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), down.stride(0), down.stride(1),
        up.stride(0), up.stride(1), y.stride(0), y.stride(1), xa.stride(0), xa.stride(1),
        HAS_BIAS=bias is not None, W_SCALE=mode, HAS_DROPOUT=dropout_p > 0.0, **meta)
    return y, xa


def _backward(dy, x2, weight, weight_scale, down, up, xa, lora_scale, dropout_p, seed):
    """dy (M, N) -> dx (M, K), d_down (R, K) fp32, d_up (N, R) fp32."""
    (M, K), N, R = x2.shape, weight.shape[0], down.shape[0]
    mode = _scale_mode(weight, weight_scale)
    dx = torch.empty_like(x2)
    dyb = torch.empty((M, R), device=x2.device, dtype=dy.dtype)
    w_scale = weight_scale.float().reshape(-1).contiguous() if mode else dx
    meta = _meta(R, x2.dtype)
    grid = lambda tile: (triton.cdiv(M, tile["BLOCK_M"]), triton.cdiv(K, tile["BLOCK_K"]))  # noqa: E731
    _lora_linear_bwd_dx_kernel[grid](
        dy, weight, w_scale, down, up, dx, dyb,
        M, N, K, R, lora_scale, dropout_p, seed,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), down.stride(0), down.stride(1),
        up.stride(0), up.stride(1), dx.stride(0), dx.stride(1), dyb.stride(0), dyb.stride(1),
        W_SCALE=mode, HAS_DROPOUT=dropout_p > 0.0, **meta)
    # d_down reduces over all M rows: split M so that enough programs run, then sum the partials.
    block_m, block_k = tiles.LORA_DOWN["BLOCK_M"], tiles.LORA_DOWN["BLOCK_K"]
    k_blocks = triton.cdiv(K, block_k)
    split = max(1, min(triton.cdiv(M, 4 * block_m), triton.cdiv(264, k_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(M, split), block_m) * block_m
    split = triton.cdiv(M, rows_per_split)
    part = torch.empty((split, R, K), device=x2.device, dtype=torch.float32)
    _lora_linear_bwd_down_kernel[(k_blocks, split)](
        dyb, x2, part, M, K, R, rows_per_split, dropout_p, seed,
        dyb.stride(0), dyb.stride(1), x2.stride(0), x2.stride(1), part.stride(0), part.stride(1), part.stride(2),
        HAS_DROPOUT=dropout_p > 0.0, **tiles.LORA_DOWN, **meta, num_warps=8 if meta["BLOCK_R"] >= 64 else 4, num_stages=3)
    d_down = part.sum(0) * lora_scale
    d_up = torch.matmul(dy.t(), xa).float() * lora_scale  # (N, R): skinny, cuBLAS does it well
    return dx, d_down, d_up


def _backward_ref(dy, x2, weight, weight_scale, down, up, lora_scale, dropout_p, seed):
    """The reference's gradients (dx, d_down, d_up) of the forward the kernel ran, with the kernel's Philox keep-mask."""
    keep = dropout_keep_mask(seed, tuple(x2.shape), dropout_p, x2.device) if dropout_p > 0.0 else None
    with torch.enable_grad():
        x, a, b = (t.detach().requires_grad_() for t in (x2, down, up))
        y = lora_linear_ref(x, weight, None, a, b, lora_scale * (1.0 - dropout_p), weight_scale=weight_scale,
                            dropout_p=dropout_p, dropout_mask=keep)
        return torch.autograd.grad(y, (x, a, b), dy)


def dropout_keep_mask(seed: int, shape: tuple, dropout_p: float, device) -> torch.Tensor:
    """The bool keep-mask the Triton kernels draw for x of `shape` (..., in) with this seed."""
    K = shape[-1]
    M = 1
    for s in shape[:-1]:
        M *= s
    keep = torch.empty((M, K), dtype=torch.int8, device=device)
    grid = (triton.cdiv(M, 64), triton.cdiv(K, 64))
    _dropout_keep_kernel[grid](keep, M, K, dropout_p, seed, BLOCK_M=64, BLOCK_K=64)
    return keep.bool().reshape(shape)


def reference_keep_mask(seed: int, shape: tuple, dropout_p: float, device) -> torch.Tensor:
    """The bool keep-mask the reference path draws for x of `shape` with this seed (torch's CPU generator, so the
    same on any device, and the same again when gradient checkpointing recomputes the forward)."""
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) >= dropout_p).to(device)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale, weight_scale, dropout_p, seed):
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        lora_scale = scale / (1.0 - dropout_p)
        y, xa = _forward(x2, weight, weight_scale, bias, down, up, lora_scale, dropout_p, seed)
        ctx.save_for_backward(x2, weight, weight_scale, down, up, xa)
        ctx.lora_scale, ctx.dropout_p, ctx.seed, ctx.x_shape = lora_scale, dropout_p, seed, x.shape
        ctx.bias_needs_grad = bias is not None and ctx.needs_input_grad[2]
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, weight_scale, down, up, xa = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        args = (dy2, x2, weight, weight_scale, down, up)
        dx, d_down, d_up = fallback.run(
            "lora_linear", shape_class(x2.dtype, weight.dtype, down.shape[0]), x2.device,
            lambda: _backward(*args, xa, ctx.lora_scale, ctx.dropout_p, ctx.seed),
            lambda: _backward_ref(*args, ctx.lora_scale, ctx.dropout_p, ctx.seed))
        d_bias = dy2.float().sum(0).to(dy.dtype) if ctx.bias_needs_grad else None
        return (dx.reshape(ctx.x_shape), None, d_bias, d_down.to(down.dtype), d_up.to(up.dtype),
                None, None, None, None)


def lora_linear(x, weight, bias, down, up, scale: float, *, weight_scale=None,
                dropout_p: float = 0.0, dropout_seed: int | None = None):
    """x W^T + b + scale * (dropout(x) down^T) up^T with W frozen (bf16/fp16, or fp8 e4m3 with weight_scale).

    dropout_p > 0 applies LoRA dropout to the low-rank input; pass it only in training.
    dropout_seed fixes the mask: the Triton kernel's Philox bits, or on the reference path `reference_keep_mask`'s
    (when None, the kernel's seed is drawn from torch's CPU generator and the reference draws its own mask).
    """
    assert 0.0 <= dropout_p < 1.0, f"dropout_p={dropout_p} must be in [0, 1)"
    x, bias, down, up = autocast_inputs(x, bias, down, up)
    # fp8 e4m3 tiles convert in hardware from sm_89 (Ada, Hopper); older GPUs dequantise in the reference
    min_capability = FP8_MIN_CAPABILITY if weight.dtype in FP8_DTYPES else MIN_CAPABILITY
    key = shape_key(x.numel() // x.shape[-1], weight.shape[0], x.shape[-1], down.shape[0], x.dtype, weight.dtype)
    if not use_triton(x, weight, down, up, min_capability=min_capability, op="lora_linear", key=key):
        mask = None if dropout_p == 0.0 or dropout_seed is None else reference_keep_mask(dropout_seed, x.shape, dropout_p, x.device)
        return lora_linear_ref(x, weight, bias, down, up, scale, weight_scale=weight_scale, dropout_p=dropout_p,
                               dropout_mask=mask)
    assert not weight.requires_grad, "the Triton path never computes dW: freeze the base weight (requires_grad_(False))"
    if dropout_seed is None:
        dropout_seed = int(torch.randint(0, 2**31 - 1, ()).item()) if dropout_p > 0.0 else 0
    return fallback.run(
        "lora_linear", shape_class(x.dtype, weight.dtype, down.shape[0]), x.device,
        lambda: LoRALinearFunction.apply(x, weight, bias, down, up, float(scale), weight_scale, float(dropout_p), dropout_seed),
        lambda: lora_linear_ref(x, weight, bias, down, up, scale, weight_scale=weight_scale, dropout_p=dropout_p))
