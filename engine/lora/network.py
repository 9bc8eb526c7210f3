"""LoRA as an explicit, reversible module swap over named_children.

`inject` replaces each targeted nn.Linear (or nn.Conv2d, LoCon) by a LoRA module that keeps the frozen
base module inside it; `LoRANetwork.remove` puts the base modules back. Module names follow kohya's
layout (`lora_unet_` + module path with `.` replaced by `_`), which every consumer reads: for SDXL the
original UNet path, for SD 1.x/2.x the diffusers path (`unet_kohya_names`).
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gesso.engine.lora import lycoris
from gesso.engine.lora.formats import read, require_placed, text_layout, unet_modules
from gesso.engine.lora.names import block_of, kohya_name
from gesso.errors import LoRAFileError
from gesso.kernels.lora_linear import lora_linear, reference_keep_mask


@dataclass(frozen=True)
class Dropout:
    """Training-time dropout of a LoRA module (kohya's network_dropout, rank_dropout, module_dropout); all 0 at inference.

    neuron: the LoRA input's features, the fused kernel's Philox mask (engine's LoRA linear), kept ones scaled by
    1 / (1 - p); rank: whole ranks per sample, the rest scaled by 1 / (1 - p) (the rank seems smaller); module: the
    module adds nothing for this step."""

    neuron: float = 0.0
    rank: float = 0.0
    module: float = 0.0

    @classmethod
    def of(cls, n) -> "Dropout":
        return cls(n.dropout, n.rank_dropout, n.module_dropout)


OFF = Dropout()


def _draw(seed: int, shape: tuple) -> torch.Tensor:
    """Uniform draws fixed by `seed`: the same in a gradient-checkpointing recomputation, a resume, on any device."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


class Dropped:
    """Where LoRALinear and LoRAConv2d share their dropout: the seed for this micro-batch (`reseed`), module dropout's
    coin and rank dropout's (B, r) mask (kohya's `torch.rand(...) > p`)."""

    dropout: Dropout = OFF
    dropout_seed: int = 0

    def skipped(self) -> bool:
        return self.dropout.module > 0 and _draw(self.dropout_seed + 1, (1,)).item() < self.dropout.module

    def rank_mask(self, batch: int, device) -> torch.Tensor:
        return (_draw(self.dropout_seed + 2, (batch, self.rank)) > self.dropout.rank).to(device)  # (B, r)


class LoRALinear(Dropped, nn.Module):
    """base(x) + scale * up(down(x)), base frozen; up starts at zero so the wrapped model is unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, float(alpha)
        self.multiplier = 1.0
        dev, dtype = base.weight.device, torch.float32
        self.lora_down = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dtype))
        self.lora_up = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.multiplier * self.alpha / self.rank

    def tensors(self) -> dict[str, nn.Parameter]:
        return {"lora_down.weight": self.lora_down, "lora_up.weight": self.lora_up}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skipped():
            return self.base(x)
        down, up = self.lora_down.to(x.dtype), self.lora_up.to(x.dtype)
        base = self.base  # nn.Linear, or engine.memory.fp8.FP8Linear: fp8 weight with a per-channel scale (out,)
        p = self.dropout.neuron
        if self.dropout.rank:  # a mask inside the rank path, per sample: the LoRA path in PyTorch, beside the base
            x_lora = x * reference_keep_mask(self.dropout_seed, x.shape, p, x.device).to(x.dtype) / (1 - p) if p else x
            lx = F.linear(x_lora, down)  # (B, ..., r)
            mask = self.rank_mask(x.shape[0], x.device).reshape(x.shape[0], *[1] * (x.dim() - 2), self.rank)
            return base(x) + self.scale / (1 - self.dropout.rank) * F.linear(lx * mask.to(x.dtype), up)
        return lora_linear(x, base.weight, base.bias, down, up, self.scale, weight_scale=getattr(base, "weight_scale", None),
                           dropout_p=p, dropout_seed=self.dropout_seed if p else None)


class LoRAConv2d(Dropped, nn.Module):
    """LoCon: a conv with the base's kernel, stride and padding down to `rank` channels, then a 1x1 conv up."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, float(alpha)
        self.multiplier = 1.0
        dev, dtype = base.weight.device, torch.float32
        kh, kw = base.kernel_size
        self.lora_down = nn.Parameter(torch.empty(rank, base.in_channels, kh, kw, device=dev, dtype=dtype))
        self.lora_up = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1, device=dev, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.multiplier * self.alpha / self.rank

    tensors = LoRALinear.tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d = self.base, self.dropout
        if self.skipped():
            return b(x)
        x_lora = x * reference_keep_mask(self.dropout_seed, x.shape, d.neuron, x.device).to(x.dtype) / (1 - d.neuron) if d.neuron else x
        h = F.conv2d(x_lora, self.lora_down.to(x.dtype), None, b.stride, b.padding, b.dilation, b.groups)  # (B, r, h, w)
        scale = self.scale
        if d.rank:
            h = h * self.rank_mask(x.shape[0], x.device)[:, :, None, None].to(h.dtype)
            scale = scale / (1 - d.rank)
        return b(x) + scale * F.conv2d(h, self.lora_up.to(x.dtype))


class LoRARows(nn.Module):
    """One of q, k, v of a fused in_proj: scale * up @ down added to rows [start, stop) of the weight.

    Not called itself: `LoRAInProj` gathers the three into the weight the attention block multiplies by.
    `base` is the attention module it was injected into, so removing the LoRA puts that module back.
    """

    def __init__(self, base: nn.MultiheadAttention, rows: tuple[int, int], rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rows = rows
        self.rank, self.alpha = rank, float(alpha)
        self.multiplier = 1.0
        dev, width = base.in_proj_weight.device, base.embed_dim
        self.lora_down = nn.Parameter(torch.empty(rank, width, device=dev, dtype=torch.float32))
        self.lora_up = nn.Parameter(torch.zeros(rows[1] - rows[0], rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.multiplier * self.alpha / self.rank

    tensors = LoRALinear.tensors

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_up @ self.lora_down)  # (w, w)


class LoRAInProj(nn.Module):
    """OpenCLIP's attention (nn.MultiheadAttention) with LoRA on the q, k and v rows of its fused in_proj.

    The block computes `F.linear(h, attn.in_proj_weight, attn.in_proj_bias)`, so the LoRA acts on the weight:
    in_proj_weight = W + cat(scale_q up_q down_q, scale_k ..., scale_v ...), which gives h W^T + scale_q (h A_q^T) B_q^T
    on the q rows and so on, exactly kohya's te2 q/k/v on transformers' separate projections. Cost: one (3w, w)
    weight per layer built each forward and kept for backward (bigG: 315 MB in bf16 over 32 layers).
    """

    def __init__(self, base: nn.MultiheadAttention, rank: int, alpha: float):
        super().__init__()
        self.base = base
        w = base.embed_dim
        self.views = nn.ModuleList(LoRARows(base, (i * w, (i + 1) * w), rank, alpha) for i in range(3))

    @property
    def in_proj_weight(self) -> torch.Tensor:
        weight = self.base.in_proj_weight  # (3w, w)
        return weight + torch.cat([v.delta() for v in self.views]).to(weight.dtype)

    @property
    def in_proj_bias(self) -> torch.Tensor:
        return self.base.in_proj_bias

    @property
    def out_proj(self) -> nn.Module:
        return self.base.out_proj

    @property
    def num_heads(self) -> int:
        return self.base.num_heads


LORA_TYPES = (LoRALinear, LoRAConv2d, LoRAInProj, lycoris.LycorisModule)


@dataclass
class LoRANetwork:
    """The injected LoRA modules of one model, by kohya name, with where each one sits.

    Each module's effective strength is the network multiplier times the weight of its block (`block_of`),
    so `set_block_weights({"input_blocks.4": 0, "middle_block": 0.5})` mutes or tempers parts at inference.
    """

    modules: dict[str, nn.Module]
    paths: dict[str, tuple[nn.Module, str, str]]  # kohya name -> (root, module path, child attribute)
    multiplier: float = 1.0
    block_weights: dict[str, float] = field(default_factory=dict)

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in m.tensors().values()]

    def named_tensors(self) -> dict[str, nn.Parameter]:
        """Every trained tensor by its file key (`<kohya name>.lora_down.weight`, `.hada_w1_a`, `.dora_scale`, ...)."""
        return {f"{name}.{key}": p for name, m in self.modules.items() for key, p in m.tensors().items()}

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        self._apply_strengths()

    def set_block_weights(self, weights: dict[str, float]) -> None:
        """Per-block factors on top of the multiplier; blocks not named keep 1. Unknown block names are an error."""
        blocks = {block_of(path) for _, path, _ in self.paths.values()}
        unknown = sorted(set(weights) - blocks)
        if unknown:
            raise ValueError(f"block {unknown[0]!r} holds no LoRA module; blocks: {', '.join(sorted(blocks))}")
        self.block_weights = dict(weights)
        self._apply_strengths()

    def _apply_strengths(self) -> None:
        for name, m in self.modules.items():
            m.multiplier = self.multiplier * self.block_weights.get(block_of(self.paths[name][1]), 1.0)

    def set_dropout(self, dropout: Dropout) -> None:
        """Dropout for training (OFF at inference) on every module that takes it: LoRA on linears and convs; the fused
        q/k/v rows of OpenCLIP's in_proj (weight deltas) and LyCORIS modules have none."""
        for m in self.modules.values():
            if isinstance(m, Dropped):
                m.dropout = dropout

    def reseed(self, seed: int) -> None:
        """New dropout masks: each module's seed from `seed` (one per micro-batch) and its place in the network."""
        for i, m in enumerate(self.modules.values()):
            if isinstance(m, Dropped):
                m.dropout_seed = (seed * 1_000_003 + 4 * i) % 2**31  # a module uses seed, +1 and +2 (engine's Dropped)

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in sorted(self.modules.items()):
            for key, p in m.tensors().items():
                out[f"{name}.{key}"] = p.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=dtype)
        return out

    def remove(self) -> None:
        """Put every frozen base module back where its LoRA module stood, the last injected first (an in_proj
        wrapper holds the attention module whose out_proj was swapped before it)."""
        for name, (root, path, attr) in reversed(self.paths.items()):
            parent = root.get_submodule(path.rpartition(".")[0]) if "." in path else root
            setattr(parent, attr, self.modules[name].base)
        self.modules.clear()
        self.paths.clear()


def inject(root: nn.Module, paths: list[str], prefix: str, rank: int | dict[str, int], alpha: float | dict[str, float],
           names: dict[str, str] | None = None, algo: str = "lora", options: lycoris.Options = lycoris.Options()) -> LoRANetwork:
    """Swap each module at `paths` (relative to `root`) for its LoRA module; rank/alpha may be per kohya name.

    names: module path -> kohya name where it is not `kohya_name(prefix, path)` (SD 1.x: `unet_kohya_names`).
    algo: "lora", or a LyCORIS adapter (`lycoris.ALGOS`) made with `options`.
    """
    modules, where = {}, {}
    for path in paths:
        parent_path, _, attr = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        base = getattr(parent, attr)
        if isinstance(base, LORA_TYPES):
            raise ValueError(f"{path} already carries a LoRA module")
        name = names[path] if names else kohya_name(prefix, path)
        r = rank[name] if isinstance(rank, dict) else rank
        a = alpha[name] if isinstance(alpha, dict) else alpha
        if algo != "lora":
            wrapper = lycoris.new_module(base, algo, r, a, options)
        else:
            wrapper = LoRALinear(base, r, a) if isinstance(base, nn.Linear) else LoRAConv2d(base, r, a)
        setattr(parent, attr, wrapper)
        modules[name], where[name] = wrapper, (root, path, attr)
    return LoRANetwork(modules, where)


def combine(*networks: LoRANetwork) -> LoRANetwork:
    """One network over the modules of several (UNet and text encoders), in injection order, for one optimizer and file."""
    modules, paths = {}, {}
    for n in networks:
        modules |= n.modules
        paths |= n.paths
    return LoRANetwork(modules, paths)


def inject_text_encoders(sd: nn.Module, rank: int, alpha: float) -> LoRANetwork:
    """LoRA on every text-encoder layer's q, k, v, out_proj, fc1, fc2 (6 per layer: CLIP-L 72, bigG 192), by kohya name.

    Names and places come from engine/lora/formats.py's text layout, the one reader of te modules: a CLIP-L module sits
    on a Linear, OpenCLIP's out_proj/fc1/fc2 on attn.out_proj/mlp.c_fc/mlp.c_proj, and its q/k/v on rows of
    attn.in_proj_weight (`LoRAInProj`). `sd` is the StableDiffusion module, whose module paths are the checkpoint keys.
    """
    targets, _, _ = text_layout(sd.cfg)
    linear = {t.key.removesuffix(".weight"): name for name, t in targets.items() if t.rows is None}
    network = inject(sd, list(linear), "", rank, alpha, names=linear)
    fused: dict[str, list[str]] = {}  # attention module path -> its q, k, v names, by row
    for name, t in sorted(targets.items(), key=lambda kv: (kv[1].key, kv[1].rows or ())):
        if t.rows is not None:
            fused.setdefault(t.key.removesuffix(".in_proj_weight"), []).append(name)
    for path, names in fused.items():
        parent_path, _, attr = path.rpartition(".")
        parent = sd.get_submodule(parent_path)
        wrapper = LoRAInProj(getattr(parent, attr), rank, alpha)
        setattr(parent, attr, wrapper)
        for name, view in zip(names, wrapper.views, strict=True):
            assert view.rows == targets[name].rows, f"{name}: rows {view.rows}, the layout says {targets[name].rows}"
            network.modules[name], network.paths[name] = view, (sd, path, attr)
    return network


def load_network(unet, path: str | Path, prefix: str = "lora_unet_", multiplier: float = 1.0):
    """Inject the UNet modules of a LoRA file (kohya, diffusers/PEFT or ComfyUI layout, LoCon included; LyCORIS's DoRA,
    LoHa and LoKr as `lycoris.LycorisModule`) into `unet` with the file's ranks, alphas and weights; the network's kohya
    names are those kohya writes for this UNet.

    A key that names nothing in this UNet is an error naming it, so a file for another architecture never
    half-loads. Text-encoder modules are not applied here (`lora_tools.merge_lora` and, when rendering,
    engine/sampling/text_lora.py apply them); `prefix` is kept
    for callers of the kohya-only version and must be `lora_unet_`.
    """
    if prefix != "lora_unet_":
        raise LoRAFileError(f"{path}: load_network places UNet modules only (prefix lora_unet_, not {prefix})")
    lo = require_placed(path, read(path, unet.cfg))
    placed = unet_modules(lo)
    if not placed:
        raise LoRAFileError(f"{path}: no UNet modules")
    names = {unet_path: name for name, (unet_path, m) in placed.items() if not isinstance(m, lycoris.Adapter)}
    network = inject(unet, list(names), prefix, rank={n: m.rank for n, (_, m) in placed.items()},
                          alpha={n: m.alpha for n, (_, m) in placed.items()}, names=names)
    with torch.no_grad():
        for name, (unet_path, m) in placed.items():
            if isinstance(m, lycoris.Adapter):  # the file's tensors are the module's; nothing to initialise
                parent_path, _, attr = unet_path.rpartition(".")
                parent = unet.get_submodule(parent_path)
                network.modules[name] = lycoris.LycorisModule(getattr(parent, attr), m.tensors, m.alpha)
                network.paths[name] = (unet, unet_path, attr)
                setattr(parent, attr, network.modules[name])
            else:
                network.modules[name].lora_down.copy_(m.down)
                network.modules[name].lora_up.copy_(m.up)
    network.set_multiplier(multiplier)
    return network
