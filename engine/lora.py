"""LoRA as an explicit, reversible module swap over named_children.

`inject` replaces each targeted nn.Linear (or nn.Conv2d, LoCon) by a LoRA module that keeps the frozen
base module inside it; `LoRANetwork.remove` puts the base modules back. Module names follow kohya's
layout (`lora_unet_` + module path with `.` replaced by `_`), which every consumer reads: for SDXL the
original UNet path, for SD 1.x/2.x the diffusers path (`unet_kohya_names`).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.lora_linear import lora_linear


class LoRALinear(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.lora_down.to(x.dtype), self.lora_up.to(x.dtype)
        base = self.base  # nn.Linear, or engine.fp8.FP8Linear: fp8 weight with a per-channel scale (out,)
        return lora_linear(x, base.weight, base.bias, down, up, self.scale, weight_scale=getattr(base, "weight_scale", None))


class LoRAConv2d(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        h = F.conv2d(x, self.lora_down.to(x.dtype), None, b.stride, b.padding, b.dilation, b.groups)
        return b(x) + self.scale * F.conv2d(h, self.lora_up.to(x.dtype))


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


LORA_TYPES = (LoRALinear, LoRAConv2d, LoRAInProj)


def attention_targets(unet: nn.Module) -> list[str]:
    """Kohya's default UNet targets: every Linear (and 1x1 conv) inside a spatial transformer.

    That is proj_in, proj_out and each block's attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj and
    ff.net.2: 722 modules in SDXL's UNet.
    """
    names = []
    for path, module in unet.named_modules():
        if not hasattr(module, "transformer_blocks"):
            continue
        for sub, child in module.named_modules():
            if isinstance(child, nn.Linear) or (isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1)):
                names.append(f"{path}.{sub}")
    return names


def locon_targets(unet: nn.Module) -> list[str]:
    """Kohya's LoCon additions: every Linear and Conv2d of the res blocks, downsamplers and upsamplers.

    That is in_layers.2, emb_layers.1, out_layers.3, skip_connection (where it is a conv), `op` and `conv`:
    66 modules in SDXL's UNet. 3x3 convs take kohya's conv rank, the rest its linear rank.
    """
    from models.unet import Downsample, ResBlock, Upsample

    names = []
    for path, module in unet.named_modules():
        if isinstance(module, (ResBlock, Downsample, Upsample)):
            names += [f"{path}.{sub}" for sub, child in module.named_modules() if isinstance(child, (nn.Linear, nn.Conv2d))]
    return names


def unet_kohya_names(unet: nn.Module, paths: list[str]) -> dict[str, str]:
    """Module path -> kohya name as kohya writes it: SDXL by the original path, SD 1.x/2.x by the diffusers path."""
    if unet.cfg.adm_in_channels is not None:
        return {p: kohya_name("lora_unet_", p) for p in paths}
    to_diffusers = original_to_diffusers_paths(unet.cfg)
    return {p: kohya_name("lora_unet_", to_diffusers[p]) for p in paths}


def original_to_diffusers_paths(cfg) -> dict[str, str]:
    """Original UNet module path -> diffusers module path, for every Linear/Conv2d of a UNet built from UNetConfig `cfg`.

    Derived from models/diffusers_format.py's renames (the project's one mapping between the layouts): every
    diffusers path this shape can have goes through `unet_from_diffusers`, its index riding in the ref's shape.
    """
    from models.diffusers_format import unet_from_diffusers
    from models.files import TensorRef

    unet = _meta_unet(cfg)
    original = {n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    candidates = _diffusers_module_paths(cfg, unet)
    refs = {f"{c}.weight": TensorRef((i,), torch.float32, lambda: None) for i, c in enumerate(candidates)}
    out = {}
    for key, ref in unet_from_diffusers(refs, "LoRA module names").items():
        path = key.removeprefix("model.diffusion_model.").removesuffix(".weight")
        if path in original:
            out[path] = candidates[ref.shape[0]]
    missing = original - set(out)
    assert not missing, f"no diffusers name for {sorted(missing)[:3]}"
    return out


def _meta_unet(ucfg) -> nn.Module:
    from models.unet import UNet

    with torch.device("meta"):
        return UNet(ucfg)


def _diffusers_module_paths(cfg, unet: nn.Module) -> list[str]:
    """The Linear/Conv2d paths a diffusers UNet of this shape can have; those it lacks are filtered by the caller."""
    from models.diffusers_format import RESNET, UNET_FIXED

    levels, nrb = len(cfg.channel_mult), cfg.num_res_blocks
    tails = sorted({sub for m in unet.modules() if hasattr(m, "transformer_blocks")
                    for sub, c in m.named_modules() if isinstance(c, (nn.Linear, nn.Conv2d))})
    down = [(f"down_blocks.{lv}", i, cfg.transformer_depth[lv] > 0) for lv in range(levels) for i in range(nrb)]
    up = [(f"up_blocks.{u}", i, cfg.transformer_depth[levels - 1 - u] > 0) for u in range(levels) for i in range(nrb + 1)]
    paths = [f"{b}.resnets.{i}.{r}" for b, i, _ in down + up for r in RESNET]
    paths += [f"{b}.attentions.{i}.{t}" for b, i, attn in down + up if attn for t in tails]
    paths += [f"mid_block.resnets.{i}.{r}" for i in range(2) for r in RESNET]
    paths += [f"mid_block.attentions.0.{t}" for t in tails]
    paths += [f"down_blocks.{lv}.downsamplers.0.conv" for lv in range(levels - 1)]
    paths += [f"up_blocks.{u}.upsamplers.0.conv" for u in range(levels - 1)]
    return paths + [k.rstrip(".") for k in UNET_FIXED]


def kohya_name(prefix: str, path: str) -> str:
    """`lora_unet_` + `input_blocks.4.1.transformer_blocks.0.attn1.to_q` -> `lora_unet_input_blocks_4_1_..._to_q`."""
    return prefix + path.replace(".", "_")


def block_of(path: str) -> str:
    """The UNet block a module path sits in: `input_blocks.4`, `middle_block`, `output_blocks.0`, else its first part."""
    parts = path.split(".")
    return ".".join(parts[:2]) if parts[0] in ("input_blocks", "output_blocks") else parts[0]


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
        return [p for m in self.modules.values() for p in (m.lora_down, m.lora_up)]

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

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in sorted(self.modules.items()):
            out[f"{name}.lora_down.weight"] = m.lora_down.detach().to("cpu", dtype).contiguous()
            out[f"{name}.lora_up.weight"] = m.lora_up.detach().to("cpu", dtype).contiguous()
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
           names: dict[str, str] | None = None) -> LoRANetwork:
    """Swap each module at `paths` (relative to `root`) for its LoRA module; rank/alpha may be per kohya name.

    names: module path -> kohya name where it is not `kohya_name(prefix, path)` (SD 1.x: `unet_kohya_names`).
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

    Names and places come from engine.lora_convert's text layout, the one reader of te modules: a CLIP-L module sits
    on a Linear, OpenCLIP's out_proj/fc1/fc2 on attn.out_proj/mlp.c_fc/mlp.c_proj, and its q/k/v on rows of
    attn.in_proj_weight (`LoRAInProj`). `sd` is the StableDiffusion module, whose module paths are the checkpoint keys.
    """
    from engine.lora_convert import text_layout

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
