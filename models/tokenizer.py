"""CLIP BPE tokenizers (transformers' CLIPTokenizer) and SDXL's chunked prompt convention.

Single-file checkpoints carry no tokenizer, so the engine ships CLIP's vocabulary in models/tokenizers/clip
(see scripts/make_clip_tokenizer.py). Every encoder uses the same BPE; they differ only in the padding id:
CLIP-L pads with the end token 49407, OpenCLIP with 0 ("!").
"""
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from gesso.models.configs import ModelConfig
from gesso.models.loaders import resolve

SHIPPED = Path(__file__).parent / "tokenizers" / "clip"
CHUNK_TOKENS = 75  # between the start and end tokens of each 77-token chunk


def _clip_tokenizer(folder: Path, pad_token: int) -> CLIPTokenizer:
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"tokenizer folder {folder} has no {name}")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok.pad_token = tok.convert_ids_to_tokens(pad_token)
    tok.model_max_length = 10**9  # chunking below handles long prompts; silences the length warning
    return tok


def load_tokenizers(cfg: ModelConfig, path=None, cache_dir=None) -> list[CLIPTokenizer]:
    """One tokenizer per text encoder of `cfg`.

    path: None or a single-file checkpoint (the shipped CLIP vocabulary), a folder with vocab.json + merges.txt
    (used for every encoder), a diffusers folder with tokenizer/ and tokenizer_2/, or a Hub repo id in the cache.
    """
    root = SHIPPED if path is None else resolve(path, cache_dir)
    if root.is_file():
        root = SHIPPED
    folders = []
    for i, _ in enumerate(cfg.text_encoders):
        sub = root / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}")
        folders.append(sub if sub.is_dir() else root)
    return [_clip_tokenizer(folder, te.pad_token) for folder, te in zip(folders, cfg.text_encoders)]


def _chunks(tok: CLIPTokenizer, prompt: str) -> list[list[int]]:
    ids = tok(prompt, add_special_tokens=False).input_ids
    return [ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)] or [[]]


def tokenize(tokenizers: list[CLIPTokenizer], prompts: list[str]) -> list[torch.Tensor]:
    """Prompts -> one LongTensor (B, 77k) per tokenizer, k = the most 75-token chunks of any prompt.

    Each chunk is [start] + up to 75 ids + [end] + padding; shorter prompts get extra empty chunks.
    """
    per_tok = [[_chunks(tok, p) for p in prompts] for tok in tokenizers]
    k = max(len(c) for chunks in per_tok for c in chunks)
    out = []
    for tok, chunks in zip(tokenizers, per_tok):
        rows = []
        for prompt_chunks in chunks:
            row = []
            for chunk in prompt_chunks + [[]] * (k - len(prompt_chunks)):
                ids = [tok.bos_token_id] + chunk + [tok.eos_token_id]
                row += ids + [tok.pad_token_id] * (CHUNK_TOKENS + 2 - len(ids))
            rows.append(row)
        out.append(torch.tensor(rows, dtype=torch.long))
    return out
