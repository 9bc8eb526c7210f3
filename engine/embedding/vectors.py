"""Textual inversion: new token vectors in frozen CLIP text encoders, trained, saved and used by name in prompts.

Each text encoder's `token_embedding` is swapped (reversibly) for a table that answers ids past the vocabulary
from extra rows; each tokenizer learns one placeholder token per row, so an embedding of n vectors stands for n
tokens. A prompt names an embedding as ComfyUI does (`embedding:name`, sd1_clip.py) or, as AUTOMATIC1111 does, by
its bare file name; `expand` turns either into the placeholders before tokenising.

Files are what the consumers load (AUTOMATIC1111 modules/textual_inversion, ComfyUI sd1_clip.load_embed, diffusers
loaders/textual_inversion.py): `emb_params` (n, width) for one text encoder (SD 1.x/2.x), `clip_l` (n, 768) and
`clip_g` (n, 1280) for SDXL. Only safetensors are read: an A1111 .pt is a pickle and is refused.
"""
import re
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from gesso.engine.io import write_bytes_atomic
from gesso.errors import GessoError
from gesso.models.files import read_safetensors

PLACEHOLDER = "<gesso-emb-{}>"
SDXL_KEYS = ("clip_l", "clip_g")  # CLIP-L, OpenCLIP bigG: the order of SDXL's text encoders


class EmbeddingFileError(GessoError):
    """An embedding file that cannot be read, or does not fit the model's text encoders."""


class TokenTable(nn.Module):
    """The frozen token table, plus `vectors` (n, width) for ids V .. V + n - 1 (V = the vocabulary size)."""

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base
        self.vectors = nn.Parameter(torch.zeros(0, base.embedding_dim, device=base.weight.device), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vocab = self.base.num_embeddings
        out = self.base(ids.clamp(max=vocab - 1))  # (B, T, width)
        if not len(self.vectors):
            return out
        extra = self.vectors[(ids - vocab).clamp(0, len(self.vectors) - 1)].to(out.dtype)
        return torch.where((ids >= vocab)[..., None], extra, out)


def _owner(encoder: nn.Module) -> nn.Module:
    """The module holding `token_embedding`: CLIP's `embeddings` (transformers names) or OpenCLIP's `model`."""
    return encoder.transformer.text_model.embeddings if hasattr(encoder, "transformer") else encoder.model


class Embeddings:
    """The embeddings attached to one model's text encoders and tokenizers, by name."""

    def __init__(self, sd: nn.Module, tokenizers: list):
        self.sd, self.tokenizers, self.names = sd, tokenizers, {}  # name -> placeholder strings
        self.tables = []
        for encoder in sd.text_encoders:
            owner = _owner(encoder)
            if not isinstance(owner.token_embedding, TokenTable):
                owner.token_embedding = TokenTable(owner.token_embedding)
            self.tables.append(owner.token_embedding)
        sd.embeddings = self  # expand() finds them from the model alone (previews, sample, grid)

    @property
    def count(self) -> int:
        return len(self.tables[0].vectors)

    def add(self, names: list[str], vectors: list[torch.Tensor], trainable: bool = False) -> None:
        """Rows `vectors[i]` (n, width_i) appended to encoder i's table, spelled by every name in `names`."""
        first = self.count
        tokens = [PLACEHOLDER.format(first + j) for j in range(len(vectors[0]))]
        for table, v in zip(self.tables, vectors):  # all checked before any tokenizer or table changes
            if v.ndim != 2 or v.shape != (len(tokens), table.base.embedding_dim):
                raise EmbeddingFileError(f"{names[0]}: vectors of shape {tuple(v.shape)}, the text encoder takes "
                                         f"({len(tokens)}, {table.base.embedding_dim})")
        for table, tok, v in zip(self.tables, self.tokenizers, vectors):
            tok.add_tokens(tokens)
            ids = tok.convert_tokens_to_ids(tokens)
            assert ids == list(range(table.base.num_embeddings + first, table.base.num_embeddings + first + len(tokens))), ids
            rows = torch.cat([table.vectors.detach(), v.detach().to(table.vectors)])
            table.vectors = nn.Parameter(rows, requires_grad=trainable)
        for name in names:
            self.names[name] = tokens

    def vectors(self, name: str) -> list[torch.Tensor]:
        """One (n, width) tensor per text encoder: the rows `name` spells."""
        start = int(self.names[name][0][len("<gesso-emb-") : -1])
        return [t.vectors[start : start + len(self.names[name])] for t in self.tables]

    def expand(self, text: str) -> str:
        """`embedding:name` (ComfyUI, an optional .safetensors kept out) and a bare `name` (A1111) -> the placeholders."""
        for name in sorted(self.names, key=len, reverse=True):  # longest first: `demo_v2` before `demo`
            pattern = rf"(?:\bembedding:{re.escape(name)}(?:\.safetensors)?|(?<![\w:-]){re.escape(name)})(?![\w-])"
            text = re.sub(pattern, " ".join(self.names[name]), text)
        return text

    def remove(self) -> None:
        for encoder, table in zip(self.sd.text_encoders, self.tables):
            _owner(encoder).token_embedding = table.base
        del self.sd.embeddings


def expand(sd: nn.Module, text: str) -> str:
    """`text` with the embeddings attached to `sd` spelled out; unchanged when none is attached."""
    embeddings = getattr(sd, "embeddings", None)
    return embeddings.expand(text) if embeddings else text


def file_tensors(vectors: list[torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The consumers' layout: `emb_params` for one text encoder, `clip_l` / `clip_g` for SDXL's two."""
    keys = ("emb_params",) if len(vectors) == 1 else SDXL_KEYS
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in zip(keys, vectors)}


def save_embedding(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    blob = save(tensors, {k: str(v) for k, v in metadata.items()})
    write_bytes_atomic(path, blob)


def read_embedding(path: str | Path, encoders: int) -> list[torch.Tensor]:
    """One float32 (n, width) tensor per text encoder from an A1111/ComfyUI/kohya embedding file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise EmbeddingFileError(f"{path}: only .safetensors embeddings are read (a .pt file is a pickle, never loaded)")
    tensors = read_safetensors(path, EmbeddingFileError)[0]
    if encoders == 2:
        if not set(SDXL_KEYS) <= tensors.keys():
            raise EmbeddingFileError(f"{path}: an SDXL embedding needs clip_l and clip_g tensors, found {sorted(tensors)}")
        return [tensors[k].float() for k in SDXL_KEYS]
    if "emb_params" in tensors:
        return [tensors["emb_params"].float()]
    if "string_to_param.*" in tensors:  # A1111's layout flattened into safetensors
        return [tensors["string_to_param.*"].float()]
    if len(tensors) == 1:  # diffusers' {token: vector}
        return [next(iter(tensors.values())).float().reshape(-1, next(iter(tensors.values())).shape[-1])]
    raise EmbeddingFileError(f"{path}: no emb_params tensor (found {sorted(tensors)[:4]}); is it an SDXL embedding?")


def attach_folder(sd: nn.Module, tokenizers: list, folder: str | Path) -> Embeddings:
    """Every `<name>.safetensors` embedding in `folder`, under its file name, for prompts to use."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EmbeddingFileError(f"{folder}: no such embeddings folder")
    embeddings = getattr(sd, "embeddings", None) or Embeddings(sd, tokenizers)
    for path in sorted(folder.glob("*.safetensors")):
        if path.stem not in embeddings.names:
            embeddings.add([path.stem], read_embedding(path, len(sd.text_encoders)))
    return embeddings
