"""Attention over (B, heads, T, head_dim) tensors, non-causal, scale 1/sqrt(head_dim).

Reference only for now; the Triton flash-attention kernel lands in the kernels issue.
"""
import torch


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v; q (B, H, Tq, D), k and v (B, H, Tk, D)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Tq, Tk)
    return torch.matmul(scores.softmax(dim=-1), v).to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attention_ref(q, k, v)
