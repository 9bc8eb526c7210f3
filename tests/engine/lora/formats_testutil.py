"""Tiny models, random LoRA networks on them, and the same UNet call in the engine and in diffusers."""
import torch
from models_testutil import diffusers_unet, diffusers_vae, hf_clip, hf_openclip
from safetensors.torch import save_file

from gesso import models
from gesso.engine.lora import names
from gesso.engine.lora import network as lora


def unet_inputs(cfg, seed: int = 0) -> dict:
    """A batch of two at a small non-square latent size, with SDXL's ADM inputs where the model takes them."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(2, 4, 8, 16, generator=g), "t": torch.tensor([3.0, 917.0]),
              "context": torch.randn(2, 77, cfg.unet.context_dim, generator=g)}
    if cfg.unet.adm_in_channels is not None:
        inputs["pooled"] = torch.randn(2, cfg.text_encoders[-1].proj_dim, generator=g)
        inputs["time_ids"] = torch.tensor([[1024.0, 768.0, 0.0, 0.0, 1024.0, 1024.0], [512.0, 832.0, 64.0, 16.0, 896.0, 1152.0]])
    return inputs


@torch.no_grad()
def engine_out(sd, inputs: dict) -> torch.Tensor:
    y = None
    if "pooled" in inputs:
        ids = inputs["time_ids"]
        y = sd.adm(inputs["pooled"], ids[:, 0:2], ids[:, 2:4], ids[:, 4:6])
    return sd.unet(inputs["x"], inputs["t"], inputs["context"], y)


@torch.no_grad()
def diffusers_out(unet, inputs: dict) -> torch.Tensor:
    extra = {}
    if "pooled" in inputs:
        extra["added_cond_kwargs"] = {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
    return unet(inputs["x"], inputs["t"], inputs["context"], **extra).sample


def pipeline(sd):
    """A diffusers pipeline holding the engine model's weights, converted by diffusers' single-file converters."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from gesso.models.tokenizer import SHIPPED

    cfg, state = sd.cfg, sd.state_dict()
    tok = CLIPTokenizer.from_pretrained(SHIPPED)
    parts = dict(unet=diffusers_unet(cfg, state), vae=diffusers_vae(cfg, state), tokenizer=tok,
                 text_encoder=hf_clip(cfg.text_encoders[0], state), scheduler=EulerDiscreteScheduler())
    if cfg.family == "sdxl":
        return StableDiffusionXLPipeline(text_encoder_2=hf_openclip(cfg.text_encoders[1], state), tokenizer_2=tok, **parts)
    return StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts)


def random_network(unet, seed: int, locon: bool = True, scale: float = 0.05) -> lora.LoRANetwork:
    """What kohya's trainer makes: attention modules (and LoCon's res-block modules) at rank 4 / alpha 3, the 3x3
    convs at a conv rank 2 / conv alpha 1 (kohya's conv_dim, conv_alpha), named as kohya names them for this UNet."""
    paths = names.attention_targets(unet) + (names.locon_targets(unet) if locon else [])
    kohya = names.unet_kohya_names(unet, paths)
    conv3 = {p for p in paths if getattr(unet.get_submodule(p), "kernel_size", (1, 1)) != (1, 1)}
    ranks = {kohya[p]: 2 if p in conv3 else 4 for p in paths}
    alphas = {kohya[p]: 1.0 if p in conv3 else 3.0 for p in paths}
    network = lora.inject(unet, paths, "lora_unet_", ranks, alphas, names=kohya)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return network


def export(sd, path, dtype=torch.float32) -> None:
    """The model as a single-file checkpoint (its state_dict keys are the single-file keys)."""
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.state_dict().items()}, str(path))


def tiny(name: str, seed: int = 1):
    return models.build(name, seed=seed).eval()
