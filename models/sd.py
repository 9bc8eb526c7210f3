"""The whole Stable Diffusion checkpoint as one module whose state_dict() keys are the single-file keys.

SDXL: `model.diffusion_model.*`, `first_stage_model.*`, `conditioner.embedders.0.transformer.*` (CLIP-L),
`conditioner.embedders.1.model.*` (OpenCLIP bigG). SD 1.x: `cond_stage_model.transformer.*`; SD 2.x:
`cond_stage_model.model.*` (OpenCLIP ViT-H).
"""
import torch
from torch import nn

from gesso.models.clip import CLIPTextEncoder, OpenCLIPTextEncoder
from gesso.models.configs import CLIPTextConfig, ModelConfig, get
from gesso.models.unet import UNet, timestep_embedding
from gesso.models.vae import AutoencoderKL

CHUNK = 77  # tokens per encoded chunk: start + 75 + end


def text_encoder(cfg) -> nn.Module:
    return CLIPTextEncoder(cfg) if isinstance(cfg, CLIPTextConfig) else OpenCLIPTextEncoder(cfg)


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: UNet):
        super().__init__()
        self.diffusion_model = unet


class Conditioner(nn.Module):
    def __init__(self, encoders: list[nn.Module]):
        super().__init__()
        self.embedders = nn.ModuleList(encoders)


class StableDiffusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNet(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        encoders = [text_encoder(c) for c in cfg.text_encoders]
        if cfg.family == "sdxl":
            self.conditioner = Conditioner(encoders)
        else:
            (self.cond_stage_model,) = encoders

    @property
    def unet(self) -> UNet:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoders(self) -> list[nn.Module]:
        if self.cfg.family == "sdxl":
            return list(self.conditioner.embedders)
        return [self.cond_stage_model]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8): the posterior mean, no sampling."""
        mean, _ = self.vae.encode(pixels)
        return mean * self.cfg.latent_scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.cfg.latent_scale)

    def encode_text(self, tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One (B, 77k) id tensor per encoder -> context (B, 77k, context_dim), pooled (B, proj) or None.

        Each 77-token chunk is encoded on its own and the chunks are concatenated along the sequence; the
        encoders' states are concatenated along channels; the pooled output comes from the first chunk.
        """
        if len(tokens) != len(self.text_encoders):
            raise ValueError(f"{len(tokens)} token tensors for {len(self.text_encoders)} text encoders")
        states, pooled = [], None
        for encoder, ids in zip(self.text_encoders, tokens):
            b, t = ids.shape
            if t % CHUNK:
                raise ValueError(f"token length {t} is not a multiple of {CHUNK}")
            hidden, pool = encoder(ids.reshape(b * (t // CHUNK), CHUNK))  # chunks batched: (B * k, 77)
            h = hidden[encoder.cfg.hidden_layer]
            if encoder.cfg.final_norm:
                h = encoder.final_norm(h)
            states.append(h.reshape(b, t, -1))
            if pool is not None and self.cfg.family == "sdxl":
                pooled = pool.reshape(b, t // CHUNK, -1)[:, 0]
        return torch.cat(states, dim=-1), pooled

    def adm(self, pooled: torch.Tensor, original_size, crop_coords, target_size) -> torch.Tensor:
        """SDXL's vector y = pooled ++ sinusoidal(orig h, orig w, crop top, crop left, target h, target w)."""
        if self.cfg.unet.adm_in_channels is None:
            raise ValueError(f"{self.cfg.name} takes no ADM conditioning")
        b = pooled.shape[0]
        sizes = [torch.as_tensor(s, dtype=torch.float32, device=pooled.device).reshape(b, 2)
                 for s in (original_size, crop_coords, target_size)]
        numbers = torch.cat(sizes, dim=1).flatten()  # (B * 6,)
        emb = timestep_embedding(numbers, self.cfg.unet.adm_embed_dim).reshape(b, -1)  # (B, 6 * 256)
        return torch.cat([pooled, emb.to(pooled.dtype)], dim=1)


def build(config, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """A randomly initialised model from a config or registry name, identical for the same seed.

    device="meta" builds the full-size definitions without allocating memory.
    """
    cfg = get(config) if isinstance(config, str) else config
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return StableDiffusion(cfg).to(dtype)
    with torch.random.fork_rng(devices=[]):  # built on the CPU generator, then moved
        torch.manual_seed(seed)
        model = StableDiffusion(cfg)
    return model.to(device=device, dtype=dtype)
