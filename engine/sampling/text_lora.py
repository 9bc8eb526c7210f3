"""A LoRA file's text-encoder modules at render time, applied as AUTOMATIC1111 applies them: each delta is added into
the encoder weight it acts on, and the weights it changed are kept on the CPU to be put back.

The UNet's modules are swapped in as modules (engine/lora/network.py), since a grid changes their strength cell by
cell and the UNet's weights are large. The text encoders run once per prompt, so patching their weights is cheap
and makes `sample` and `grid` render what the training previews rendered with a LoRA trained on the encoders
(`network.train_text_encoders`), and what ComfyUI and AUTOMATIC1111 render with the file.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from gesso.engine.lora import formats


@dataclass
class TextLoRA:
    modules: dict[str, list[tuple[formats.Target, object]]]  # checkpoint key -> (where it acts, Module or lycoris.Adapter)
    originals: dict[str, torch.Tensor]  # checkpoint key -> the weight before any delta, on the CPU
    strength: float = 0.0  # what the encoders carry now


def read_text_lora(sd: torch.nn.Module, path: Path) -> TextLoRA | None:
    """The file's text-encoder modules for `sd` (its module paths are the checkpoint keys); None when it has none."""
    lo = formats.require_placed(path, formats.read(path, sd.cfg))  # a module that names nothing here is an error
    targets = lo.layout.targets
    modules: dict[str, list] = {}
    for n, m in lo.modules.items():
        if targets[n].unet_path is None:
            modules.setdefault(targets[n].key, []).append((targets[n], m))
    if not modules:
        return None
    params = dict(sd.named_parameters())
    return TextLoRA(modules, {key: params[key].detach().to("cpu", copy=True) for key in modules})


@torch.no_grad()
def set_strength(sd: torch.nn.Module, tl: TextLoRA, strength: float) -> bool:
    """Make the encoders carry the file at `strength` (0: their own weights, bit for bit); True if any weight changed."""
    if strength == tl.strength:
        return False
    params = dict(sd.named_parameters())
    for key, original in tl.originals.items():
        if strength == 0:
            params[key].copy_(original)
            continue
        # on the CPU, one weight at a time, as the file's tensors are; a copy, so that the original stays
        w = formats.add_deltas(original.to(torch.float32, copy=True), [(t, m, strength) for t, m in tl.modules[key]])
        params[key].copy_(w.to(params[key].dtype))
    tl.strength = strength
    return True
