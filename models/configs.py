"""Typed, frozen architecture configs and the named registry (`SDXL_BASE`, `SD15`, `TINY_SDXL`, ...).

Constants for the real models come from Stability's generative-models configs (`sd_xl_base.yaml`,
`v1-inference.yaml`, `v2-inference-v.yaml`); see /work/shared/REFERENCE.md.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (0, 2, 10)  # per level; 0 = no attention at that level
    transformer_depth_middle: int = 10
    head_dim: int | None = 64  # heads = channels // head_dim (SDXL, SD 2.x) ...
    num_heads: int | None = None  # ... or a fixed head count (SD 1.x)
    context_dim: int = 2048
    adm_in_channels: int | None = 2816  # None: no label_emb (SD 1.x, SD 2.x)
    use_linear_in_transformer: bool = True  # Linear proj_in/proj_out (SDXL, SD 2.x) vs 1x1 convs (SD 1.x)
    adm_embed_dim: int = 256  # sinusoidal width of each size/crop number in the ADM vector
    norm_groups: int = 32  # GroupNorm groups (32 in every released model; fewer keep small widths' colour)

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text tower in transformers' names (CLIP ViT-L/14 for SDXL's first encoder and SD 1.x)."""

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"
    hidden_layer: int = -2  # index into hidden states (embeddings output, then one per layer)
    final_norm: bool = False  # apply final_layer_norm to that hidden state (SD 1.x)
    pad_token: int = 49407


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """OpenCLIP text tower in open_clip names (ViT-bigG/14 for SDXL, ViT-H/14 for SD 2.x)."""

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 1280
    layers: int = 32
    heads: int = 20
    mlp_dim: int = 5120
    proj_dim: int | None = 1280  # None: no text_projection
    act: str = "gelu"
    hidden_layer: int = -2
    final_norm: bool = False  # SD 2.x applies ln_final to the penultimate state
    pad_token: int = 0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str  # "sdxl" | "sd15" | "sd2"
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[CLIPTextConfig | OpenCLIPTextConfig, ...]
    latent_scale: float
    prediction: str = "epsilon"  # or "v_prediction" (diffusers' names)
    zero_terminal_snr: bool = False  # trained on betas rescaled to ᾱ_T = 0 (engine/diffusion.py)


SDXL_BASE = ModelConfig(
    name="sdxl",
    family="sdxl",
    unet=UNetConfig(),
    vae=VAEConfig(),
    text_encoders=(CLIPTextConfig(), OpenCLIPTextConfig()),
    latent_scale=0.13025,
)

SD15 = ModelConfig(
    name="sd15",
    family="sd15",
    unet=UNetConfig(
        channel_mult=(1, 2, 4, 4),
        transformer_depth=(1, 1, 1, 0),
        transformer_depth_middle=1,
        head_dim=None,
        num_heads=8,
        context_dim=768,
        adm_in_channels=None,
        use_linear_in_transformer=False,
    ),
    vae=VAEConfig(),
    text_encoders=(CLIPTextConfig(hidden_layer=-1, final_norm=True),),
    latent_scale=0.18215,
)

SD21 = ModelConfig(
    name="sd21",
    family="sd2",
    unet=UNetConfig(
        channel_mult=(1, 2, 4, 4),
        transformer_depth=(1, 1, 1, 0),
        transformer_depth_middle=1,
        context_dim=1024,
        adm_in_channels=None,
    ),
    vae=VAEConfig(),
    text_encoders=(OpenCLIPTextConfig(width=1024, layers=24, heads=16, mlp_dim=4096, proj_dim=1024, final_norm=True),),
    latent_scale=0.18215,
    prediction="v_prediction",
)

# SDXL's topology at widths that train in seconds on a CPU: every GroupNorm width a multiple of 32.
TINY_SDXL = ModelConfig(
    name="tiny-sdxl",
    family="sdxl",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 4),
        transformer_depth=(0, 1, 2),
        transformer_depth_middle=2,
        head_dim=16,
        context_dim=32 + 64,
        adm_in_channels=64 + 6 * 256,
    ),
    vae=VAEConfig(ch=32),
    text_encoders=(
        CLIPTextConfig(width=32, layers=3, heads=2, mlp_dim=128),
        OpenCLIPTextConfig(width=64, layers=3, heads=4, mlp_dim=256, proj_dim=64),
    ),
    latent_scale=0.13025,
)

# The bundled demo's pretrained base (examples/demo-base.safetensors, made by scripts/train_demo_base.py): SDXL's
# topology at widths that train on a CPU. A GroupNorm of one channel per group removes each channel's mean, which
# is the absolute colour of a flat image, so its norms have 4 to 8 channels a group, as SDXL's 320 and 128 wide
# layers have 10 and 4. Widths differ from tiny-sdxl's, so a file of either is told apart by its shapes.
DEMO_SDXL = ModelConfig(
    name="demo-sdxl",
    family="sdxl",
    unet=UNetConfig(
        model_channels=48,
        channel_mult=(1, 2, 2),
        transformer_depth=(0, 1, 1),
        transformer_depth_middle=1,
        head_dim=32,
        context_dim=16 + 32,
        adm_in_channels=32 + 6 * 256,
        norm_groups=8,
    ),
    vae=VAEConfig(ch=16, norm_groups=4),
    text_encoders=(
        CLIPTextConfig(width=16, layers=2, heads=2, mlp_dim=64),
        OpenCLIPTextConfig(width=32, layers=2, heads=2, mlp_dim=128, proj_dim=32),
    ),
    latent_scale=0.13025,
)

TINY_SD15 = ModelConfig(
    name="tiny-sd15",
    family="sd15",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 4, 4),
        transformer_depth=(1, 1, 1, 0),
        transformer_depth_middle=1,
        head_dim=None,
        num_heads=2,
        context_dim=32,
        adm_in_channels=None,
        use_linear_in_transformer=False,
    ),
    vae=VAEConfig(ch=32),
    text_encoders=(CLIPTextConfig(width=32, layers=3, heads=2, mlp_dim=128, hidden_layer=-1, final_norm=True),),
    latent_scale=0.18215,
)

TINY_SD2 = ModelConfig(
    name="tiny-sd2",
    family="sd2",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 4, 4),
        transformer_depth=(1, 1, 1, 0),
        transformer_depth_middle=1,
        head_dim=16,
        context_dim=64,
        adm_in_channels=None,
    ),
    vae=VAEConfig(ch=32),
    text_encoders=(OpenCLIPTextConfig(width=64, layers=3, heads=4, mlp_dim=256, proj_dim=64, final_norm=True),),
    latent_scale=0.18215,
    prediction="v_prediction",
)

REGISTRY: dict[str, ModelConfig] = {c.name: c for c in (SDXL_BASE, SD15, SD21, TINY_SDXL, DEMO_SDXL, TINY_SD15,
                                                         TINY_SD2)}


def get(name: str) -> ModelConfig:
    if name not in REGISTRY:
        raise KeyError(f"unknown model config {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
