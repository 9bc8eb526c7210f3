"""Where LoRA goes in a UNet and what each module is called: kohya's default targets, LoCon's additions, and
kohya names in the original (SDXL) or the diffusers (SD 1.x/2.x) spelling, as every consumer reads them."""
import torch
import torch.nn as nn

from gesso.models.diffusers_format import RESNET, UNET_FIXED, unet_from_diffusers
from gesso.models.files import TensorRef
from gesso.models.unet import Downsample, ResBlock, UNet, Upsample


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
    unet = meta_unet(cfg)
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


def meta_unet(ucfg) -> nn.Module:
    with torch.device("meta"):
        return UNet(ucfg)


def _diffusers_module_paths(cfg, unet: nn.Module) -> list[str]:
    """The Linear/Conv2d paths a diffusers UNet of this shape can have; those it lacks are filtered by the caller."""
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
