"""CLIP text towers: ViT-L/14 in transformers' names and OpenCLIP (ViT-bigG/14, ViT-H/14) in open_clip names.

Both return every hidden state so the caller picks the layer its model family conditions on. Attention here is
causal and short (77 tokens), so it uses torch's SDPA rather than the engine's non-causal kernel.
"""
import torch
import torch.nn.functional as F
from torch import nn

from gesso.models.configs import CLIPTextConfig, OpenCLIPTextConfig


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu(x)
    raise ValueError(f"unknown activation {name!r}")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, C) each -> (B, T, C), causal softmax attention over `heads` heads."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)


END_TOKEN = 49407


def end_position(ids: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's first end token. The checkpoints' code takes argmax(ids), the same while 49407 is the
    largest id; textual-inversion tokens (ids 49408 and up) would win that argmax, so the end token is looked up."""
    return (ids == END_TOKEN).int().argmax(dim=-1)


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int, act: str):
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.act, self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp_dim, cfg.act)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)
        # Real files carry this int64 buffer; loaders treat it as optional.
        self.register_buffer("position_ids", torch.arange(cfg.max_positions)[None], persistent=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding(self.position_ids[:, : ids.shape[1]])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class CLIPTextModel(nn.Module):
    """Holds `text_model` so keys read `text_model.embeddings...`, as in transformers and the checkpoints."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)


class CLIPTextEncoder(nn.Module):
    """CLIP ViT-L/14 text tower under `transformer.` (the `FrozenCLIPEmbedder` layout of the checkpoints)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = CLIPTextModel(cfg)

    def forward(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """ids (B, 77) -> (hidden states [embeddings, after layer 1, ..., after layer n], pooled (B, width)).

        pooled = final_layer_norm(last) at the first end token.
        """
        tm = self.transformer.text_model
        x = tm.embeddings(ids)  # (B, T, width)
        hidden = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            hidden.append(x)
        pooled = tm.final_layer_norm(x)[torch.arange(ids.shape[0], device=ids.device), end_position(ids)]
        return hidden, pooled

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.text_model.final_layer_norm(x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(cfg.width, cfg.mlp_dim))
        self.mlp.add_module("c_proj", nn.Linear(cfg.mlp_dim, cfg.width))
        self.act = cfg.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        q, k, v = F.linear(h, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)  # (B, T, width)
        x = x + self.attn.out_proj(causal_attention(q, k, v, self.attn.num_heads))
        return x + self.mlp.c_proj(activation(self.act, self.mlp.c_fc(self.ln_2(x))))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextModel(nn.Module):
    """OpenCLIP text tower, the keys of `conditioner.embedders.1.model.` (SDXL) / `cond_stage_model.model.` (SD 2.x)."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_positions, cfg.width))
        self.transformer = OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        if cfg.proj_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.proj_dim))  # used as x @ text_projection
        # Unused for text; a buffer so parameter counts match the reference text towers, optional when loading.
        self.register_buffer("logit_scale", torch.tensor(4.6052), persistent=True)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if cfg.proj_dim is not None:
            nn.init.normal_(self.text_projection, std=cfg.width**-0.5)


class OpenCLIPTextEncoder(nn.Module):
    """OpenCLIP text tower under `model.` (the `FrozenOpenCLIPEmbedder2` layout of the checkpoints)."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = OpenCLIPTextModel(cfg)

    def forward(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """ids (B, 77) -> (hidden states [embeddings, after block 1, ..., after block n], pooled (B, proj) or None).

        pooled = ln_final(last) at the first end token @ text_projection, as SDXL's `FrozenOpenCLIPEmbedder2` computes it.
        """
        m = self.model
        x = m.token_embedding(ids) + m.positional_embedding[: ids.shape[1]]  # (B, T, width)
        hidden = [x]
        for block in m.transformer.resblocks:
            x = block(x)
            hidden.append(x)
        if not hasattr(m, "text_projection"):
            return hidden, None
        pooled = m.ln_final(x)[torch.arange(ids.shape[0], device=ids.device), end_position(ids)]
        return hidden, pooled @ m.text_projection

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.ln_final(x)
