"""LoRA as an explicit, reversible module swap over named_children.

`inject` replaces each targeted nn.Linear (or nn.Conv2d, LoCon) by a LoRA module that keeps the frozen
base module inside it; `LoRANetwork.remove` puts the base modules back. Module names follow kohya's
layout (`lora_unet_` + module path with `.` replaced by `_`), which every consumer reads.
"""
import math
from dataclasses import dataclass

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
        return lora_linear(x, self.base.weight, self.base.bias, down, up, self.scale)


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


LORA_TYPES = (LoRALinear, LoRAConv2d)


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


def kohya_name(prefix: str, path: str) -> str:
    """`lora_unet_` + `input_blocks.4.1.transformer_blocks.0.attn1.to_q` -> `lora_unet_input_blocks_4_1_..._to_q`."""
    return prefix + path.replace(".", "_")


@dataclass
class LoRANetwork:
    """The injected LoRA modules of one model, by kohya name, with where each one sits."""

    modules: dict[str, nn.Module]
    paths: dict[str, tuple[nn.Module, str, str]]  # kohya name -> (root, module path, child attribute)

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in (m.lora_down, m.lora_up)]

    def set_multiplier(self, multiplier: float) -> None:
        for m in self.modules.values():
            m.multiplier = multiplier

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in sorted(self.modules.items()):
            out[f"{name}.lora_down.weight"] = m.lora_down.detach().to("cpu", dtype).contiguous()
            out[f"{name}.lora_up.weight"] = m.lora_up.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=dtype)
        return out

    def remove(self) -> None:
        """Put every frozen base module back where its LoRA module stood."""
        for name, (root, path, attr) in self.paths.items():
            parent = root.get_submodule(path.rpartition(".")[0]) if "." in path else root
            setattr(parent, attr, self.modules[name].base)
        self.modules.clear()
        self.paths.clear()


def inject(root: nn.Module, paths: list[str], prefix: str, rank: int | dict[str, int], alpha: float | dict[str, float]) -> LoRANetwork:
    """Swap each module at `paths` (relative to `root`) for its LoRA module; rank/alpha may be per kohya name."""
    modules, where = {}, {}
    for path in paths:
        parent_path, _, attr = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        base = getattr(parent, attr)
        if isinstance(base, LORA_TYPES):
            raise ValueError(f"{path} already carries a LoRA module")
        name = kohya_name(prefix, path)
        r = rank[name] if isinstance(rank, dict) else rank
        a = alpha[name] if isinstance(alpha, dict) else alpha
        wrapper = LoRALinear(base, r, a) if isinstance(base, nn.Linear) else LoRAConv2d(base, r, a)
        setattr(parent, attr, wrapper)
        modules[name], where[name] = wrapper, (root, path, attr)
    return LoRANetwork(modules, where)
