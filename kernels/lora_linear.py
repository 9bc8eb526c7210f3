"""Frozen linear plus low-rank update: y = x W^T + b + scale * (x A^T) B^T.

Reference only for now; the fused Triton kernel lands in the kernels issue.
"""
import torch
import torch.nn.functional as F


def lora_linear_ref(x, weight, bias, down, up, scale: float, upcast: bool = False):
    """x (..., in), weight (out, in), bias (out,) or None, down (r, in), up (out, r)."""
    dtype = x.dtype
    if upcast:
        x, weight, down, up = x.float(), weight.float(), down.float(), up.float()
        bias = None if bias is None else bias.float()
    y = F.linear(x, weight, bias) + scale * F.linear(F.linear(x, down), up)
    return y.to(dtype)


def lora_linear(x, weight, bias, down, up, scale: float):
    return lora_linear_ref(x, weight, bias, down, up, scale)
