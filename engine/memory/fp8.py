"""Frozen base weights stored in fp8 e4m3: an explicit, reversible module swap over named_children.

`quantize_frozen` replaces every frozen nn.Linear and nn.Conv2d (also the bases inside LoRA wrappers,
never the LoRA parameters) by an FP8Linear / FP8Conv2d holding the weight as float8_e4m3fn with one
fp32 scale per output channel (absmax / 448) and the bias as it was; `dequantize` puts plain modules back.
Call it after `lora.inject` (whose targets are found by type nn.Linear / nn.Conv2d) and after freezing.
The fp8 modules dequantise in forward and again in backward, so no dequantised weight is kept for
backward; `module.to(dtype)` casts their bias only, device moves apply to everything.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from gesso.kernels.lora_linear import FrozenFP8Linear, dequantize_weight  # the one dequantisation, linears' and convs'

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, ...) -> fp8 codes (out, ...) and fp32 scale (out,) = per-row absmax / 448 (1 for all-zero rows)."""
    w = weight.detach().float()
    absmax = w.abs().flatten(1).amax(1)  # (out,)
    scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
    codes = (w / _per_row(scale, w.dim())).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # e4m3fn has no inf: clamp
    return codes, scale


def _per_row(scale: torch.Tensor, dim: int) -> torch.Tensor:
    return scale.reshape(-1, *([1] * (dim - 1)))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear/Conv2d computes in for input x: autocast's when it is on, else x's."""
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _FP8Conv2dFunction(torch.autograd.Function):
    """conv2d(x, W) + b with W dequantised in forward and again in backward, read from the module then.

    Nothing is saved for backward: the codes are the module's own frozen buffers, read where backward runs
    (engine/memory/blockswap.py has them in place then). A saved tensor would make a checkpointed block's
    recomputation run this whole conv only to save its weight again (a custom Function saves after its
    forward has computed, aten's ops before), 0.37 TFLOP per SDXL step at 1024 px for nothing.
    """

    @staticmethod
    def forward(ctx, x, module, bias, dtype):
        ctx.module, ctx.dtype, ctx.x_dtype, ctx.x_shape = module, dtype, x.dtype, x.shape
        ctx.bias_dtype = None if bias is None or not ctx.needs_input_grad[2] else bias.dtype
        b = None if bias is None else bias.to(dtype)
        w = dequantize_weight(module.weight, module.weight_scale, dtype)
        return F.conv2d(x.to(dtype), w, b, module.stride, module.padding, module.dilation, module.groups)

    @staticmethod
    def backward(ctx, dy):
        m = ctx.module
        dy = dy.to(ctx.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            w = dequantize_weight(m.weight, m.weight_scale, ctx.dtype)
            dx = torch.nn.grad.conv2d_input(ctx.x_shape, w, dy, m.stride, m.padding, m.dilation, m.groups).to(ctx.x_dtype)
        d_bias = dy.float().sum((0, 2, 3)).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        return dx, None, d_bias, None


class _FP8Module(nn.Module):
    """Shared storage: `weight` fp8 (buffer), `weight_scale` fp32 (out,) (buffer), `bias` (frozen parameter or None).

    `dtype` is the weight's dtype before quantisation, restored by `dequantize`; it follows module casts.
    """

    def _store(self, base: nn.Module) -> None:
        codes, scale = quantize_weight(base.weight)
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", scale)
        self.bias = base.bias
        self.dtype = base.weight.dtype

    def _apply(self, fn, recurse=True):
        # the fp8 codes and the fp32 scale take device moves but never dtype casts (unet.to(torch.bfloat16))
        codes, scale = self._buffers.pop("weight"), self._buffers.pop("weight_scale")
        try:
            super()._apply(fn, recurse)
        finally:
            # where, and in what dtype, fn puts floats; None: swapped out to the host (engine/memory/blockswap.py), left there
            probe = fn(torch.empty(0, dtype=self.dtype, device="cpu" if codes is None else codes.device))
            self.dtype = probe.dtype
            self._buffers["weight"] = None if codes is None else codes.to(probe.device)
            self._buffers["weight_scale"] = None if scale is None else scale.to(probe.device)
        return self

    def _restored(self, module: nn.Module) -> nn.Module:
        module.weight = nn.Parameter(dequantize_weight(self.weight, self.weight_scale, self.dtype), requires_grad=False)
        module.bias = self.bias
        return module


class FP8Linear(_FP8Module):
    """nn.Linear with its frozen weight (out, in) in fp8 e4m3 and a per-output-channel scale."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self._store(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return FrozenFP8Linear.apply(x.to(dtype), self.weight, self.weight_scale, bias)

    def to_linear(self) -> nn.Linear:
        with torch.device("meta"):
            m = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        return self._restored(m)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8 e4m3"


class FP8Conv2d(_FP8Module):
    """nn.Conv2d (zeros padding) with its frozen weight (out, in/groups, kh, kw) in fp8 e4m3 and a per-output-channel scale."""

    def __init__(self, base: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = base.in_channels, base.out_channels, base.kernel_size
        self.stride, self.padding, self.dilation, self.groups = base.stride, base.padding, base.dilation, base.groups
        self._store(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FP8Conv2dFunction.apply(x, self, self.bias, _compute_dtype(x))

    def to_conv2d(self) -> nn.Conv2d:
        with torch.device("meta"):
            m = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, self.groups, bias=self.bias is not None)
        return self._restored(m)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}, fp8 e4m3")


def _quantizable(m: nn.Module) -> bool:
    """Plain frozen Linear / zero-padded Conv2d (exact types: nn.MultiheadAttention's out_proj subclass reads its weight directly)."""
    if type(m) is nn.Linear:
        return not m.weight.requires_grad
    if type(m) is nn.Conv2d:
        return not m.weight.requires_grad and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return False


def quantize_frozen(module: nn.Module) -> int:
    """Swap every frozen nn.Linear / nn.Conv2d below `module` (LoRA bases included) for its fp8 module; returns how many."""
    count = 0
    for name, child in module.named_children():
        if _quantizable(child):
            setattr(module, name, FP8Linear(child) if isinstance(child, nn.Linear) else FP8Conv2d(child))
            count += 1
        else:
            count += quantize_frozen(child)
    return count


def dequantize(module: nn.Module) -> int:
    """Put a plain nn.Linear / nn.Conv2d (weights = the fp8 values times their scales) back for every fp8 module; returns how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, (FP8Linear, FP8Conv2d)):
            setattr(module, name, child.to_linear() if isinstance(child, FP8Linear) else child.to_conv2d())
            count += 1
        else:
            count += dequantize(child)
    return count


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by the parameters and buffers of `module` (each tensor once): its weights' storage."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
