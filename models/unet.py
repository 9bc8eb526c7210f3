"""The LDM/SGM UNet (SD 1.x, SD 2.x, SDXL) with the original attribute names.

`UNet().state_dict()` keys equal a single-file checkpoint's keys after `model.diffusion_model.`, so real weights
load with strict=True. Unlike the original, nothing is zero-initialised: a random model has a non-trivial output,
which the LoRA tests and the tiny demo need.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gesso.kernels.attention import attention
from gesso.models.configs import UNetConfig


class Unit(nn.Module):
    """A res-block or transformer block: what engine/memory/blockswap.py moves, and what checkpointing recomputes.

    With gradient checkpointing each res-block, each transformer block (pairs of them in deep transformers),
    each transformer's norm and proj_in, each upsampler and the output head keep only their inputs for
    backward and recompute the rest there. Pairs: SDXL's 60 blocks in its depth-10 transformers at the lowest
    resolution have small inputs (2.5 MB at 1024 px), all held at the start of backward, the step's peak; a
    pair halves them and recomputes no more (each block once), and its larger working set comes later, once
    less is held. At 4x the tokens (SDXL's depth-2 level) a pair's working set would be the new peak.
    """

    checkpointed = False


def run_checkpointed(on: bool, fn, *args: torch.Tensor | None) -> torch.Tensor:
    if on and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (B,) numbers -> (B, dim), cos first as in the original code."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(channels: int, eps: float = 1e-5, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps)


class ResBlock(Unit):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(channels, groups=groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels, groups=groups), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:  # an output block's: concatenated here, so a checkpoint keeps x and the skip (kept anyway), not both again
            x = torch.cat([x, skip], dim=1)
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        # the skip conv last: a recomputation (checkpointing) stops once it has what backward saved, which is
        # before the last saving op's own compute, so neither of the two closing convs is recomputed
        return self.out_layers(h) + self.skip_connection(x)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, T, heads * D)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
        out = attention(q, k, v).transpose(1, 2).flatten(2)  # (B, Tq, heads * D)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(Unit):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, linear: bool,
                 groups: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = group_norm(channels, eps=1e-6, groups=groups)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)
        self.group = 2 if depth > 2 else 1  # blocks per checkpoint (see Unit)

    checkpointed = False  # the norm and proj_in, between two units: kept, they would hold two more feature maps

    def _project_in(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return self.proj_in(x) if self.linear else x

    def _blocks(self, x: torch.Tensor, context: torch.Tensor, start: int) -> torch.Tensor:
        for block in self.transformer_blocks[start:start + self.group]:
            x = block(x, context)
        return x

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = run_checkpointed(self.checkpointed, self._project_in, x)
        for start in range(0, len(self.transformer_blocks), self.group):
            x = run_checkpointed(self.checkpointed, self._blocks, x, context, start)
        if self.linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).unflatten(2, (h, w))  # (B, C, H, W)
        if not self.linear:
            x = self.proj_out(x)
        return x + x_in


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    checkpointed = False  # kept, the conv would hold its input at 4x the size of ours

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_checkpointed(self.checkpointed, self._forward, x)


class TimestepEmbedSequential(nn.Sequential):
    """One input/middle/output block: passes emb to ResBlocks and context to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                skip: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x, skip = run_checkpointed(layer.checkpointed, layer, x, emb, skip), None
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self._checkpointing = False
        mc, g = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads_and_dim(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer, g)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans = [mc]
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc, g)]
                ch = mult * mc
                if cfg.transformer_depth[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, g), transformer(ch, cfg.transformer_depth_middle), ResBlock(ch, emb_dim, ch, g)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_dim, mult * mc, g)]
                ch = mult * mc
                if cfg.transformer_depth[level] > 0:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch, groups=g), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def units(self) -> list[Unit]:
        """Every res-block and transformer block, in the order forward runs them (SDXL: 17 and 70)."""
        return [m for m in self.modules() if isinstance(m, Unit)]

    @property
    def gradient_checkpointing(self) -> bool:
        return self._checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        """Checkpoint what Unit says; the rest (conv_in, downsamplers, proj_out) keeps its inputs, which are
        held anyway as skips or as a checkpoint's inputs."""
        self._checkpointing = bool(on)
        for m in self.modules():
            if isinstance(m, (Unit, SpatialTransformer, Upsample)):
                m.checkpointed = bool(on)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, C, H, W), timesteps (B,), context (B, T, context_dim), y (B, adm) -> (B, C_out, H, W).

        Inputs are cast to the compute dtype, that of the norms' weights (never quantised, unlike fp8 bases),
        and the output comes in it: a UNet stored in bf16 runs in bf16 end to end, without autocast.
        """
        dtype = self.out[0].weight.dtype
        x, context = x.to(dtype), context.to(dtype)
        y = None if y is None else y.to(dtype)
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype))  # (B, 4 * mc)
        if self.cfg.adm_in_channels is not None:
            if y is None:
                raise ValueError("this UNet takes ADM conditioning: pass y (B, adm_in_channels)")
            emb = emb + self.label_emb(y.to(x.dtype))
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(h, emb, context, skips.pop())
        return run_checkpointed(self._checkpointing, self.out, h)  # its three 320-channel maps at full size
