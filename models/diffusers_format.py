"""The one place where a layout differs: diffusers folders mapped onto the original single-file names.

Renames follow the block arithmetic of the original UNet (input block 1 + level * (res blocks + 1) + i, ...),
OpenCLIP's q/k/v are fused back into `in_proj_weight`, `text_projection` is transposed back, and the VAE's
linear attention weights become 1x1 convs again. Tensors stay lazy; the caller checks the result's key count
and every shape against the engine's own definition.
"""
import re

import torch

from gesso.models.files import CheckpointError, TensorRef

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
              "time_embedding.linear_2.": "time_embed.2.", "add_embedding.linear_1.": "label_emb.0.0.",
              "add_embedding.linear_2.": "label_emb.0.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
            "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}


def reshaped(ref: TensorRef, shape: tuple[int, ...]) -> TensorRef:
    return TensorRef(shape, ref.dtype, lambda: ref.load().reshape(shape))


def transposed(ref: TensorRef) -> TensorRef:
    return TensorRef(ref.shape[::-1], ref.dtype, lambda: ref.load().t().contiguous())


def fused(refs: list[TensorRef]) -> TensorRef:
    shape = (sum(r.shape[0] for r in refs),) + refs[0].shape[1:]
    return TensorRef(shape, refs[0].dtype, lambda: torch.cat([r.load() for r in refs]))


def _put(out: dict, key: str, ref: TensorRef, source: str) -> None:
    if key in out:
        raise CheckpointError(f"{source}: two diffusers keys map onto {key!r}")
    out[key] = ref


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET.get(head, head)}.{tail}"


def _unet_key(key: str, nrb: int, up_attention: set[int]) -> str | None:
    for old, new in UNET_FIXED.items():
        if key.startswith(old):
            return new + key[len(old):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + level * (nrb + 1) + i
        return f"input_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (nrb + 1) + nrb}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        up, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = up * (nrb + 1) + i
        return f"output_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        up = int(m[1])
        return f"output_blocks.{up * (nrb + 1) + nrb}.{2 if up in up_attention else 1}.conv.{m[2]}"
    return None


def unet_from_diffusers(refs: dict[str, TensorRef], source: str) -> dict[str, TensorRef]:
    nrb = len({k.split(".")[3] for k in refs if k.startswith("down_blocks.0.resnets.")})
    up_attention = {int(k.split(".")[1]) for k in refs if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out = {}
    for key, ref in refs.items():
        new = _unet_key(key, nrb, up_attention)
        if new is None:
            raise CheckpointError(f"{source}: diffusers UNet key {key!r} has no place in the original layout")
        _put(out, "model.diffusion_model." + new, ref, source)
    return out


def _vae_key(key: str, ref: TensorRef, levels: int) -> tuple[str, TensorRef] | None:
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}", ref
    if re.fullmatch(r"(encoder\.|decoder\.)?(conv_in|conv_out)\..+|(post_)?quant_conv\..+", key):
        return key, ref
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", ref
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        if m[2] not in VAE_ATTN:
            return None
        if m[3] == "weight" and len(ref.shape) == 2:
            ref = reshaped(ref, ref.shape + (1, 1))
        return f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}", ref
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", ref
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", ref
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level = levels - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", ref
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}", ref
    return None


def vae_from_diffusers(refs: dict[str, TensorRef], source: str) -> dict[str, TensorRef]:
    levels = len({k.split(".")[2] for k in refs if k.startswith("decoder.up_blocks.")})
    out = {}
    for key, ref in refs.items():
        mapped = _vae_key(key, ref, levels)
        if mapped is None:
            raise CheckpointError(f"{source}: diffusers VAE key {key!r} has no place in the original layout")
        _put(out, "first_stage_model." + mapped[0], mapped[1], source)
    return out


def clip_from_transformers(refs: dict[str, TensorRef], prefix: str) -> dict[str, TensorRef]:
    """transformers' CLIPTextModel (with or without the `text_model.` level) -> `<prefix>transformer.text_model.*`."""
    return {f"{prefix}transformer.text_model.{k.removeprefix('text_model.')}": r for k, r in refs.items()}


def openclip_from_transformers(refs: dict[str, TensorRef], prefix: str, source: str) -> dict[str, TensorRef]:
    """transformers' CLIPTextModel(WithProjection) -> open_clip names under `<prefix>model.`."""
    refs = {k.removeprefix("text_model."): r for k, r in refs.items() if not k.endswith("position_ids")}
    out, qkv = {}, {}
    for key, ref in refs.items():
        if key == "embeddings.token_embedding.weight":
            new = "token_embedding.weight"
        elif key == "embeddings.position_embedding.weight":
            new = "positional_embedding"
        elif key.startswith("final_layer_norm."):
            new = "ln_final." + key.split(".")[-1]
        elif key == "text_projection.weight":
            new, ref = "text_projection", transposed(ref)
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = ref
            continue
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            if m[2] not in OPENCLIP:
                raise CheckpointError(f"{source}: text encoder key {key!r} has no place in the open_clip layout")
            new = f"transformer.resblocks.{m[1]}.{OPENCLIP[m[2]]}.{m[3]}"
        else:
            raise CheckpointError(f"{source}: text encoder key {key!r} has no place in the open_clip layout")
        _put(out, f"{prefix}model.{new}", ref, source)
    for (layer, kind), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:
            raise CheckpointError(f"{source}: layer {layer} has {sorted(parts)} of q/k/v {kind}")
        _put(out, f"{prefix}model.transformer.resblocks.{layer}.attn.in_proj_{kind}",
             fused([parts["q"], parts["k"], parts["v"]]), source)
    return out


def diffusers_to_original(parts: dict[str, dict[str, TensorRef]], family: str, source: str) -> dict[str, TensorRef]:
    """Components of a diffusers folder ("unet", "vae", "text_encoder", "text_encoder_2") -> single-file keys.

    Asserts that every tensor lands on exactly one key (q/k/v fuse three into one).
    """
    out = {}
    out.update(unet_from_diffusers(parts["unet"], source))
    out.update(vae_from_diffusers(parts["vae"], source))
    if family == "sdxl":
        out.update(clip_from_transformers(parts["text_encoder"], "conditioner.embedders.0."))
        out.update(openclip_from_transformers(parts["text_encoder_2"], "conditioner.embedders.1.", source))
    elif family == "sd15":
        out.update(clip_from_transformers(parts["text_encoder"], "cond_stage_model."))
    else:
        out.update(openclip_from_transformers(parts["text_encoder"], "cond_stage_model.", source))
    n_in = sum(len(p) for p in parts.values())
    n_fused = sum(k.endswith(("q_proj.weight", "q_proj.bias")) for name, p in parts.items()
                  for k in p if name == "text_encoder_2" or family == "sd2")
    n_dropped = sum(k.endswith("position_ids") for name, p in parts.items() for k in p
                    if name == "text_encoder_2" or family == "sd2")
    if len(out) != n_in - 2 * n_fused - n_dropped:
        raise CheckpointError(f"{source}: {n_in} diffusers tensors became {len(out)} original ones")
    return out
