"""DoRA, LoHa and LoKr (the LyCORIS adapters), swapped in like LoRA and saved in the keys LyCORIS writes.

Each adapter adds a weight delta ΔW to a frozen Linear or Conv2d, built from its own tensors (file key suffixes):
- dora: `lora_down.weight`, `lora_up.weight`, `dora_scale`; W' = m · (W + s·up@down) / ‖W + s·up@down‖ per column
  (the input axis, dora_scale (1, in, 1, 1)) or per row (the output axis, (out, 1, 1, 1)), ΔW = W' - W (Liu et al. 2024, eq. 5);
- loha: `hada_w1_a` (out, r), `hada_w1_b` (r, in·k), `hada_w2_a`, `hada_w2_b`; ΔW = s · (w1_a@w1_b) ⊙ (w2_a@w2_b) (FedPara, eq. 3);
- lokr: `lokr_w1` (a, c) or `lokr_w1_a`@`lokr_w1_b`, `lokr_w2` (b, d, *k) or `lokr_w2_a`@`lokr_w2_b`; ΔW = s · w1 ⊗ w2.
s = alpha / rank, rank being the inner size of the factorised pair (LoKr with no pair: s = 1), as ComfyUI
(comfy/weight_adapter/) and AUTOMATIC1111 (extensions-builtin/Lora/network_*.py) compute it. At strength k a module
adds k·ΔW, DoRA included (k·(W' - W)), as both apply it.
The forward is base(x) + op(x, ΔW), LyCORIS's weight-rebuild forward: one extra matmul (or conv) per module;
a DoRA Linear at strength 1 (training) runs through the fused LoRA kernel instead (`dora_linear`).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gesso.errors import LoRAFileError
from gesso.kernels.lora_linear import dequantize_weight, lora_linear

ALGOS = ("dora", "loha", "lokr")
KEYS = {  # file key suffix -> attribute of the module holding it
    "lora_down.weight": "lora_down", "lora_up.weight": "lora_up", "dora_scale": "dora_scale",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b",
}
SUFFIXES = tuple(KEYS) + ("alpha",)
TUCKER = ("hada_t1", "hada_t2", "lokr_t2", "lora_mid.weight")  # read by the consumers; not written or read here


@dataclass(frozen=True)
class Options:
    lokr_factor: int = 0  # LoKr's split of each dimension (LyCORIS `factor`); 0: the most balanced (LyCORIS -1)
    dora_on_output: bool = False  # DoRA's norm per output row (LyCORIS wd_on_output) instead of per input column

    @classmethod
    def of(cls, network) -> "Options":
        """From the config's NetworkSection (`network.lokr_factor`, `network.dora_wd_on_output`)."""
        return cls(lokr_factor=network.lokr_factor, dora_on_output=network.dora_wd_on_output)


def factorization(dim: int, factor: int = 0) -> tuple[int, int]:
    """(m, n), m <= n, m·n = dim: m = factor when it divides dim, else the most balanced pair with m <= factor
    (any m when factor is 0); LyCORIS's `factorization`, so a file's LoKr shapes match the ones LyCORIS makes."""
    if factor > 0 and dim % factor == 0:
        return tuple(sorted((factor, dim // factor)))
    limit = factor if factor > 0 else dim
    m = 1
    for cand in range(2, math.isqrt(dim) + 1):
        if dim % cand == 0 and cand <= limit:
            m = cand
    return m, dim // m


def algo_of(tensors: dict[str, torch.Tensor]) -> str:
    """dora (LoRA with `dora_scale`), loha or lokr; a LoHa or LoKr may carry a `dora_scale` too (LyCORIS's dora_wd on them)."""
    if any(k.startswith("hada_") for k in tensors):
        return "loha"
    return "lokr" if any(k.startswith("lokr_") for k in tensors) else "dora"


def rank_of(tensors: dict[str, torch.Tensor]) -> int | None:
    """The inner size alpha divides by, or None for a LoKr module with no factorised pair (scale 1); a LoKr with both
    halves factorised divides by w2's, as ComfyUI (lokr.py) and AUTOMATIC1111 (network_lokr.py) read it."""
    for key, dim in (("lora_down.weight", 0), ("hada_w1_b", 0), ("lokr_w2_a", 1), ("lokr_w1_a", 1)):
        if key in tensors:
            return tensors[key].shape[dim]
    return None


def lokr_parts(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """w1 (a, c) and w2 (b, d, *k or flattened) in fp32, each from its factorised pair where the file has one."""
    w1 = t["lokr_w1"].float() if "lokr_w1" in t else t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
    w2 = t["lokr_w2"].float() if "lokr_w2" in t else t["lokr_w2_a"].float() @ t["lokr_w2_b"].float().flatten(1)
    return w1, w2


def dora_weight(weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m · W / ‖W‖, the norm along the axis the magnitude's shape names: (out, 1, ...) per row, (1, in, ...) per column."""
    on_output = magnitude.shape[0] == weight.shape[0] and magnitude.shape[0] != 1
    if on_output:
        norm = weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        norm = weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))
    return weight * (magnitude.float().reshape(norm.shape) / (norm + torch.finfo(weight.dtype).eps))


def dora_magnitude(weight: torch.Tensor, on_output: bool) -> torch.Tensor:
    """‖W‖ along DoRA's axis, shaped as the file stores it: (out, 1, ...) or (1, in, ...)."""
    w = weight.float()
    if on_output:
        return w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    return w.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))


def delta_weight(tensors: dict[str, torch.Tensor], alpha: float, shape: tuple[int, ...],
                 base: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW (fp32, `shape`) of one module at strength 1; with a `dora_scale`, the base weight it rescales is needed."""
    t, rank = tensors, rank_of(tensors)
    scale = 1.0 if rank is None else alpha / rank
    algo = algo_of(t)
    if algo == "dora":
        delta = scale * (t["lora_up.weight"].float().flatten(1) @ t["lora_down.weight"].float().flatten(1)).reshape(shape)
    elif algo == "loha":
        w1 = t["hada_w1_a"].float() @ t["hada_w1_b"].float().flatten(1)
        w2 = t["hada_w2_a"].float() @ t["hada_w2_b"].float().flatten(1)
        delta = (scale * w1 * w2).reshape(shape)
    else:
        w1, w2 = lokr_parts(t)
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])  # (b, d, *k)
        delta = (scale * torch.kron(w1.reshape(*w1.shape, *[1] * (len(shape) - 2)), w2)).reshape(shape)
    if "dora_scale" not in t:
        return delta
    if base is None:
        raise ValueError("a DoRA delta depends on the base weight; pass it")
    w = base.float().reshape(shape)
    return dora_weight(w + delta, t["dora_scale"]) - w


def check(path, source: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> None:
    """A one-line LoRAFileError naming the module when its tensors cannot make a delta of the weight's `shape`."""
    tucker = [k for k in TUCKER if k in tensors]
    if tucker:
        raise LoRAFileError(f"{path}: {source} is a Tucker-decomposed module ({tucker[0]}), which Gesso does not read")
    out, fan_in = shape[0], math.prod(shape[1:])
    algo, t = algo_of(tensors), tensors
    need = {"dora": ("lora_down.weight", "lora_up.weight", "dora_scale"), "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
            "lokr": ()}[algo]
    missing = [k for k in need if k not in t]
    if algo == "lokr":
        missing = [k for k, pair in (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")) if k not in t and pair not in t]
        missing += [k.replace("_a", "_b") for k in ("lokr_w1_a", "lokr_w2_a") if k in t and k.replace("_a", "_b") not in t]
    if missing:
        raise LoRAFileError(f"{path}: {algo} module {source} lacks {missing[0]}")
    m = t.get("dora_scale")
    fits = m is None or (m.numel() in (out, shape[1]) and m.shape[0] in (out, 1))
    if algo == "dora":
        r = t["lora_down.weight"].shape[0]
        fits = fits and t["lora_down.weight"].numel() == r * fan_in and t["lora_up.weight"].numel() == out * r
    elif algo == "loha":
        r = t["hada_w1_b"].shape[0]
        fits = fits and all(t[k].numel() == n for k, n in (("hada_w1_a", out * r), ("hada_w2_a", out * r),
                                                             ("hada_w1_b", r * fan_in), ("hada_w2_b", r * fan_in)))
        fits = fits and t["hada_w1_a"].shape[0] == out and t["hada_w2_b"].shape[0] == r
    else:
        try:
            w1, w2 = lokr_parts(t)
        except RuntimeError:  # a factorised half whose inner sizes differ
            w1 = w2 = torch.zeros(0, 0)
        fits = fits and w1.dim() == 2 and w1.shape[0] * w2.shape[0] == out and w1.shape[1] * w2[0:1].numel() == fan_in
    if not fits:
        got = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(t.items()))
        raise LoRAFileError(f"{path}: {algo} module {source} has {got}; the model's weight is {shape}")


@dataclass
class Adapter:
    """One LyCORIS module as a file holds it (the counterpart of formats.Module for LoRA)."""

    tensors: dict[str, torch.Tensor]  # file key suffix -> tensor
    alpha: float

    @property
    def algo(self) -> str:
        return algo_of(self.tensors)

    @property
    def rank(self) -> int:
        return rank_of(self.tensors) or 1

    def delta(self, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        return delta_weight(self.tensors, self.alpha, shape, base)

    def to(self, dtype: torch.dtype) -> "Adapter":
        return Adapter({k: v.to(dtype) for k, v in self.tensors.items()}, self.alpha)


def base_weight(base: nn.Module) -> torch.Tensor:
    """The frozen weight in fp32; an fp8 base (engine/memory/fp8.py) is dequantised with its per-output-channel scale."""
    return dequantize_weight(base.weight, getattr(base, "weight_scale", None), torch.float32)


class LycorisModule(nn.Module):
    """A frozen Linear or Conv2d plus one LyCORIS adapter's ΔW; the tensors are fp32 parameters named as KEYS says."""

    def __init__(self, base: nn.Module, tensors: dict[str, torch.Tensor], alpha: float):
        super().__init__()
        self.base = base
        self.alpha = float(alpha)
        self.multiplier = 1.0
        self.keys = tuple(k for k in KEYS if k in tensors)
        for key in self.keys:
            setattr(self, KEYS[key], nn.Parameter(tensors[key].detach().to(base.weight.device, torch.float32).clone()))

    @property
    def algo(self) -> str:
        return algo_of(self.tensors())

    @property
    def rank(self) -> int:
        return rank_of(self.tensors()) or 1

    def tensors(self) -> dict[str, nn.Parameter]:
        return {key: getattr(self, KEYS[key]) for key in self.keys}

    def delta(self) -> torch.Tensor:
        w = self.base.weight
        base = base_weight(self.base) if "dora_scale" in self.keys else None
        return self.multiplier * delta_weight(self.tensors(), self.alpha, tuple(w.shape), base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        if self.algo == "dora" and self.multiplier == 1.0 and self.lora_down.dim() == 2:
            return dora_linear(x, b, self.tensors(), self.alpha)
        delta = self.delta().to(x.dtype)
        if delta.dim() == 2:
            return b(x) + F.linear(x, delta)
        return b(x) + F.conv2d(x, delta, None, b.stride, b.padding, b.dilation, b.groups)


def dora_linear(x: torch.Tensor, base: nn.Module, t: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """A DoRA Linear at strength 1 through the fused LoRA kernel, never building W + s·up@down.

    W' = (W + sBA) diag(c) on the input axis gives y = lora_linear(x ∘ c, W, b, A, B, s); on the output axis
    W' = diag(c)(W + sBA) gives y = c ∘ lora_linear(x, W, 0, A, B, s) + b; c = m / ‖W + sBA‖, whose squared norms
    expand into ‖W‖² + 2s·(A∘(BᵀW)) + s²·(A∘(BᵀB)A) summed per column (per row: the same with W, A, B transposed),
    products of rank r: O(out·in·r) like one token's LoRA path, and no (out, in) temporary beyond W itself.
    """
    down, up, m = t["lora_down.weight"], t["lora_up.weight"], t["dora_scale"]  # (r, in), (out, r), (1, in) or (out, 1)
    s = alpha / down.shape[0]
    w = base_weight(base)  # (out, in) fp32
    ws = getattr(base, "weight_scale", None)
    if m.shape[0] == 1:
        norm_sq = w.square().sum(0) + 2 * s * (down * (up.T @ w)).sum(0) + s * s * (down * ((up.T @ up) @ down)).sum(0)
        c = m.reshape(-1) / (norm_sq.clamp_min(0).sqrt() + torch.finfo(torch.float32).eps)  # (in,)
        return lora_linear(x * c.to(x.dtype), base.weight, base.bias, down.to(x.dtype), up.to(x.dtype), s, weight_scale=ws)
    norm_sq = w.square().sum(1) + 2 * s * (up * (w @ down.T)).sum(1) + s * s * (up * (up @ (down @ down.T))).sum(1)
    c = m.reshape(-1) / (norm_sq.clamp_min(0).sqrt() + torch.finfo(torch.float32).eps)  # (out,)
    y = lora_linear(x, base.weight, None, down.to(x.dtype), up.to(x.dtype), s, weight_scale=ws) * c.to(x.dtype)
    return y if base.bias is None else y + base.bias.to(x.dtype)


def fresh_tensors(base: nn.Module, algo: str, rank: int, options: Options) -> dict[str, torch.Tensor]:
    """A new module's tensors, initialised as LyCORIS does so that ΔW starts at zero (DoRA: W' = W)."""
    weight = base_weight(base)  # (out, in) or (out, in, kh, kw)
    out, fan_in, k = weight.shape[0], math.prod(weight.shape[1:]), tuple(weight.shape[2:])
    if algo == "dora":
        down = torch.empty(rank, *weight.shape[1:])
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        up = torch.zeros(out, rank, *[1] * len(k))
        return {"lora_down.weight": down, "lora_up.weight": up, "dora_scale": dora_magnitude(weight, options.dora_on_output)}
    if algo == "loha":
        return {"hada_w1_a": torch.randn(out, rank) * 0.1, "hada_w1_b": torch.randn(rank, fan_in),
                "hada_w2_a": torch.zeros(out, rank), "hada_w2_b": torch.randn(rank, fan_in)}
    if algo != "lokr":
        raise ValueError(f"unknown adapter {algo!r}; choose lora or one of {', '.join(ALGOS)}")
    out_l, out_k = factorization(out, options.lokr_factor)
    in_m, in_n = factorization(weight.shape[1], options.lokr_factor)
    w1 = torch.empty(out_l, in_m)
    nn.init.kaiming_uniform_(w1, a=math.sqrt(5))
    if rank >= max(out_k, in_n) / 2:  # the factorised w2 would be no smaller than the full one: LyCORIS's rule
        return {"lokr_w1": w1, "lokr_w2": torch.zeros(out_k, in_n, *k)}
    w2_a = torch.empty(out_k, rank)
    nn.init.kaiming_uniform_(w2_a, a=math.sqrt(5))
    return {"lokr_w1": w1, "lokr_w2_a": w2_a, "lokr_w2_b": torch.zeros(rank, in_n * math.prod(k))}


def new_module(base: nn.Module, algo: str, rank: int, alpha: float, options: Options) -> LycorisModule:
    tensors = fresh_tensors(base, algo, rank, options)
    if rank_of(tensors) is None:
        alpha = float(rank)  # a LoKr of two full matrices has scale 1; LyCORIS then writes alpha = rank
    return LycorisModule(base, tensors, alpha)


def network_args(algo: str, options: Options | None = None, conv_rank: int = 0, conv_alpha: float = 1.0) -> dict[str, str]:
    """`ss_network_args` as kohya's trainer records LyCORIS's (`--network_args`, every value a string): DoRA is LyCORIS's
    LoRA/LoCon with `dora_wd`; `options` adds the axis and the LoKr factor (LyCORIS's -1 for the most balanced)."""
    args = {"algo": ("locon" if conv_rank else "lora") if algo == "dora" else algo}
    if conv_rank:
        args |= {"conv_dim": str(conv_rank), "conv_alpha": f"{conv_alpha:g}"}
    if algo == "dora":
        args["dora_wd"] = "True"
        if options is not None:
            args["wd_on_output"] = str(options.dora_on_output)
    if algo == "lokr" and options is not None:
        args["factor"] = str(options.lokr_factor or -1)
    return args
