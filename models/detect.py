"""Architecture detection from key names, and the comparison of a checkpoint's keys and shapes against the
engine's own definitions. Marker keys follow diffusers' `infer_diffusers_model_type` and ComfyUI's
`model_detection.py` (facts only)."""
from dataclasses import dataclass, field, replace
from functools import cache

import torch

from gesso.models.configs import REGISTRY, ModelConfig
from gesso.models.files import CheckpointError, TensorRef
from gesso.models.sd import build

SDXL_BIGG = "conditioner.embedders.1.model.transformer.resblocks."  # diffusers tests its block 9
UNET = "model.diffusion_model."
FAMILY_DEFAULT = {"sdxl": "sdxl", "sd15": "sd15", "sd2": "sd21"}
FAMILY_NAME = {"sdxl": "SDXL", "sd15": "SD 1.x", "sd2": "SD 2.x"}
# Present in some files, absent in others; filled with their defaults when missing.
OPTIONAL_SUFFIXES = ("embeddings.position_ids", "model.logit_scale")
# Keys real files carry that the engine does not use.
IGNORED_PREFIXES = ("model_ema.", "denoiser.", "lvlb_weights", "logvar")
IGNORED_KEYS = {"v_pred", "ztsnr", "edm_mean", "edm_std", "betas", "alphas_cumprod", "alphas_cumprod_prev",
                "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"}


def is_lora(keys) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_down." in k
               or ".lora_A." in k or ".lora.down." in k for k in keys)


def detect_family(keys, source: str) -> str:
    """'sdxl', 'sd15' or 'sd2'; anything else raises a one-line CheckpointError saying what the file holds."""
    keys = set(keys)
    has_unet = any(k.startswith(UNET + "input_blocks.") for k in keys)
    if is_lora(keys):
        n = sum(k.endswith(("lora_down.weight", "lora_A.weight", "lora.down.weight")) for k in keys)
        raise CheckpointError(f"{source}: a LoRA ({n} modules), not a base checkpoint; pass it as a LoRA")
    if any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in keys):
        raise CheckpointError(f"{source}: a Stable Diffusion 3 (MMDiT) checkpoint, not supported")
    if any(k.startswith(("double_blocks.", UNET + "double_blocks.")) for k in keys):
        raise CheckpointError(f"{source}: a Flux checkpoint, not supported")
    if any(k.startswith("transformer_blocks.") for k in keys) and "context_embedder.weight" in keys:
        raise CheckpointError(f"{source}: a diffusers DiT transformer (SD3/Flux family), not supported")
    if has_unet and any(k.startswith(SDXL_BIGG) for k in keys):
        return "sdxl"
    if has_unet and any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise CheckpointError(f"{source}: an SDXL refiner checkpoint (one OpenCLIP encoder), not supported")
    if has_unet and any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"
    if has_unet and any(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in keys):
        return "sd2"
    if has_unet:
        raise CheckpointError(f"{source}: a UNet without text encoders; a full checkpoint is needed")
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.", "first_stage_model.")) for k in keys):
        raise CheckpointError(f"{source}: a VAE-only file, not a full checkpoint")
    if any(k.startswith("down_blocks.") for k in keys):
        raise CheckpointError(f"{source}: a diffusers UNet weights file; pass the whole diffusers folder")
    first = sorted(keys)[:2]
    raise CheckpointError(f"{source}: not a Stable Diffusion checkpoint ({len(keys)} tensors, e.g. {first})")


def with_prediction(cfg: ModelConfig, keys) -> ModelConfig:
    """`cfg` as the file says it was trained, by ComfyUI's rule (supported_models.SDXL.model_type): a `v_pred` marker
    key means v-prediction, and a `ztsnr` key beside it zero terminal SNR; a file without one keeps the architecture's
    default (epsilon, v-prediction for SD 2.x's 768-v)."""
    keys = set(keys)
    if "v_pred" not in keys:
        return cfg
    return replace(cfg, prediction="v_prediction", zero_terminal_snr="ztsnr" in keys)


def is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def is_optional(key: str) -> bool:
    return key.endswith(OPTIONAL_SUFFIXES)


@cache
def expected_shapes(name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (shape, dtype)} of the engine's definition of a registry config, built on the meta device."""
    return {k: (tuple(v.shape), v.dtype) for k, v in build(REGISTRY[name], device="meta").state_dict().items()}


@dataclass
class Comparison:
    config: ModelConfig
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: file (a, b) vs engine (c, d)"
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def first_problem(self) -> str:
        for label, items in (("missing", self.missing), ("mismatched", self.mismatched),
                             ("unexpected", self.unexpected)):
            if items:
                return f"{len(items)} {label} keys vs the engine's {self.config.name} definition, e.g. {items[0]}"
        return "keys match"


def compare(cfg: ModelConfig, refs: dict[str, TensorRef]) -> Comparison:
    expected = expected_shapes(cfg.name)
    result = Comparison(cfg)
    for key, (shape, _) in expected.items():
        if key not in refs:
            if not is_optional(key):
                result.missing.append(key)
        elif tuple(refs[key].shape) != shape:
            result.mismatched.append(f"{key}: file {tuple(refs[key].shape)} vs engine {shape}")
    for key in refs:
        if key not in expected:
            (result.ignored if is_ignored(key) else result.unexpected).append(key)
    return result


def match_config(family: str, refs: dict[str, TensorRef]) -> Comparison:
    """The registry config of `family` whose keys and shapes the file matches; else the comparison against the
    closest one (fewest differences; the full-size config on ties), which names what differs."""
    candidates = sorted((c for c in REGISTRY.values() if c.family == family),
                        key=lambda c: c.name != FAMILY_DEFAULT[family])
    results = [compare(c, refs) for c in candidates]
    return min(results, key=lambda r: len(r.missing) + len(r.unexpected) + len(r.mismatched))
