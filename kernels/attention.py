"""Attention over (B, heads, T, head_dim) tensors, non-causal, scale 1/sqrt(head_dim): flash attention.

FlashAttention-2 style: the forward streams K/V tiles through an online softmax with fp32 accumulators
and keeps only the row log-sum-exp, the backward recomputes P tile by tile (one pass for dK/dV, one for
dQ), so memory is linear in T and no (Tq, Tk) matrix ever exists. Head dims 40/80/160 are padded to the
next power of two with masks; fast for SDXL's heads of 64 at 1024-16384 tokens. Head dims above 256 (the
VAE's single 512-wide head) fall back to torch's scaled_dot_product_attention: one 512-wide fp32 tile row
per query exceeds the registers of an SM, and that attention runs once per image, in inference.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gesso.kernels import fallback, tiles
from gesso.kernels.dispatch import autocast_inputs, shape_key, use_triton
from gesso.kernels.tuning import autotuned

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634

def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v; q (B, H, Tq, D), k and v (B, H, Tk, D)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Tq, Tk)
    return torch.matmul(scores.softmax(dim=-1), v).to(dtype)


@autotuned(tiles.attention_configs(tiles.ATTENTION_FWD), tiles.ATTENTION_INTERPRETER, key=["H", "Tq", "Tk", "D"],
           prune=tiles.ATTENTION_FWD_PRUNE)
@triton.jit
def _attention_fwd_kernel(
    # pointers
    q_ptr,  # shape (B, H, Tq, D)
    k_ptr,  # shape (B, H, Tk, D)
    v_ptr,  # shape (B, H, Tk, D)
    o_ptr,  # shape (B, H, Tq, D)
    lse_ptr,  # shape (B * H, Tq) fp32, log2-domain row log-sum-exp of the scaled scores
    # sizes
    H, Tq, Tk, D, qk_scale,
    # strides
    stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
    # meta
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m, mask_d = offs_m < Tq, offs_d < D
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, Tk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Tk
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             acc.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + pid_bh * Tq + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _attention_bwd_preprocess_kernel(
    # pointers
    o_ptr,  # shape (B, H, Tq, D), contiguous
    do_ptr,  # shape (B, H, Tq, D), contiguous
    delta_ptr,  # shape (B * H * Tq,) fp32: rowsum(dO * O)
    # sizes
    rows, D,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < rows)[:, None] & (offs_d < D)[None, :]
    o = tl.load(o_ptr + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + offs_m, tl.sum(o * do, 1), mask=offs_m < rows)


@autotuned(tiles.attention_configs(tiles.ATTENTION_DKDV), tiles.ATTENTION_INTERPRETER, key=["H", "Tq", "Tk", "D"],
           prune=tiles.ATTENTION_DKDV_PRUNE)
@triton.jit
def _attention_bwd_dkdv_kernel(
    # pointers
    q_ptr,  # shape (B, H, Tq, D)
    k_ptr,  # shape (B, H, Tk, D)
    v_ptr,  # shape (B, H, Tk, D)
    do_ptr,  # shape (B, H, Tq, D), contiguous
    lse_ptr,  # shape (B * H, Tq) fp32, log2 domain
    delta_ptr,  # shape (B * H, Tq) fp32
    dk_ptr,  # shape (B, H, Tk, D), contiguous
    dv_ptr,  # shape (B, H, Tk, D), contiguous
    # sizes
    H, Tq, Tk, D, sm_scale, qk_scale,
    # strides
    stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    # meta
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n, mask_d = offs_n < Tk, offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + pid_bh * Tq * D
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=mask_nd, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=mask_nd, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, Tq, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < Tq
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * D + offs_d[None, :], mask=mask_md, other=0.0)
        lse = tl.load(lse_ptr + pid_bh * Tq + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + pid_bh * Tq + offs_m, mask=mask_m, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.where(mask_m[:, None], tl.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    out = pid_bh * Tk * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=mask_nd)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=mask_nd)


@autotuned(tiles.attention_configs(tiles.ATTENTION_DQ), tiles.ATTENTION_INTERPRETER, key=["H", "Tq", "Tk", "D"],
           prune=tiles.ATTENTION_DQ_PRUNE)
@triton.jit
def _attention_bwd_dq_kernel(
    # pointers
    q_ptr,  # shape (B, H, Tq, D)
    k_ptr,  # shape (B, H, Tk, D)
    v_ptr,  # shape (B, H, Tk, D)
    do_ptr,  # shape (B, H, Tq, D), contiguous
    lse_ptr,  # shape (B * H, Tq) fp32, log2 domain
    delta_ptr,  # shape (B * H, Tq) fp32
    dq_ptr,  # shape (B, H, Tq, D), contiguous
    # sizes
    H, Tq, Tk, D, sm_scale, qk_scale,
    # strides
    stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    # meta
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m, mask_d = offs_m < Tq, offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=mask_md, other=0.0)
    rows = pid_bh * Tq * D + offs_m[:, None] * D + offs_d[None, :]
    do = tl.load(do_ptr + rows, mask=mask_md, other=0.0)
    lse = tl.load(lse_ptr + pid_bh * Tq + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(delta_ptr + pid_bh * Tq + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, Tk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_nd = (offs_n < Tk)[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.where((offs_n < Tk)[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(dq_ptr + rows, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=mask_md)


def _dot_precision(dtype) -> str:
    """fp32 inputs (the interpreter tests) get exact fp32 products, not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(q, k, v):
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q, k, v must be (B, H, T, D)"
    assert k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} must match"
    assert q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3], (
        f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B, H and D")
    assert q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"dtype {q.dtype} unsupported"
    assert q.shape[3] <= MAX_HEAD_DIM, f"head dim {q.shape[3]} > {MAX_HEAD_DIM}: use the SDPA fallback"
    assert q.shape[2] > 0 and k.shape[2] > 0, "empty sequence"


def _forward(q, k, v):
    """q (B, H, Tq, D), k, v (B, H, Tk, D) -> o (B, H, Tq, D) contiguous, lse (B * H, Tq) fp32 log2."""
    _check(q, k, v)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    o = torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B * H, Tq), device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(D))
    sm_scale = D ** -0.5
    _attention_fwd_kernel[lambda tile: (triton.cdiv(Tq, tile["BLOCK_M"]), B * H)](
        q, k, v, o, lse, H, Tq, Tk, D, sm_scale * LOG2E, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype))
    return o, lse


def _backward(do, q, k, v, o, lse):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    do = do.contiguous()
    block_d = max(16, triton.next_power_of_2(D))
    delta = torch.empty((B * H, Tq), device=q.device, dtype=torch.float32)
    _attention_bwd_preprocess_kernel[(triton.cdiv(B * H * Tq, 64),)](o, do, delta, B * H * Tq, D,
                                                                     BLOCK_M=64, BLOCK_D=block_d)
    dq = torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, Tk, D), device=q.device, dtype=q.dtype)
    dv = torch.empty_like(dk)
    sm_scale = D ** -0.5
    args = (H, Tq, Tk, D, sm_scale, sm_scale * LOG2E, *q.stride(), *k.stride(), *v.stride())
    meta = dict(BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype))
    _attention_bwd_dkdv_kernel[lambda tile: (triton.cdiv(Tk, tile["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, *args, **meta)
    _attention_bwd_dq_kernel[lambda tile: (triton.cdiv(Tq, tile["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, *args, **meta)
    return dq, dk, dv


def _backward_ref(do, q, k, v):
    """dq, dk, dv of torch's scaled_dot_product_attention at the same q, k, v: the reference's gradients."""
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        return torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), do)


def shape_class(dtype, head_dim: int) -> str:
    """The fallback's unit (kernels/fallback.py): one family of tiles per dtype and padded head dim."""
    padded = min(d for d in tiles.ATTENTION_FWD if d >= max(16, triton.next_power_of_2(head_dim)))
    return f"{str(dtype).removeprefix('torch.')}, head dim<={padded}"


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = _forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        return fallback.run("attention", shape_class(q.dtype, q.shape[-1]), q.device,
                            lambda: _backward(do, q, k, v, o, lse), lambda: _backward_ref(do, q, k, v))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q (B, H, Tq, D), k and v (B, H, Tk, D); returns (B, H, Tq, D).

    Without the Triton kernel (reference mode, CPUs, GPUs below 8.0) this is torch's
    scaled_dot_product_attention, not `attention_ref`: on a GPU SDPA picks a flash or memory-efficient
    kernel and never holds the (Tq, Tk) scores, which at SDXL's 4096 tokens are ~11.7 GB a step for the math.
    """
    q, k, v = autocast_inputs(q, k, v)
    key = shape_key(*q.shape, k.shape[2], q.dtype)  # B, H, Tq, D, Tk, dtype
    if q.shape[-1] > MAX_HEAD_DIM or not use_triton(q, k, v, op="attention", key=key):
        return F.scaled_dot_product_attention(q, k, v)
    return fallback.run("attention", shape_class(q.dtype, q.shape[-1]), q.device,
                        lambda: FlashAttentionFunction.apply(q, k, v), lambda: F.scaled_dot_product_attention(q, k, v))
