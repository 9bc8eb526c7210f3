"""AUTOMATIC1111's prompt syntax and its weighted, chunked text encoding.

`(text)` x1.1 per level, `[text]` /1.1, `(text:w)` x w, `\\(` `\\)` `\\[` `\\]` `\\\\` literal, `BREAK` ends the
75-token chunk, `<lora:name:w>` tags are taken out of the text; lines starting with `#` are comments. Each text
fragment is tokenised on its own, chunks of 75 tokens are cut at a comma within the last 20 tokens when there is
one, and each chunk is encoded as start + 75 + end. Weights then scale the encoder output per token: "a1111"
multiplies and restores the chunk's mean, "comfy" moves each token away from the empty prompt's encoding.
Not supported: prompt editing `[a:b:0.5]` and alternation `[a|b]` (they read as plain bracketed text).
"""
import re
from dataclasses import dataclass

import torch

from gesso.errors import PromptError

ROUND, SQUARE = 1.1, 1 / 1.1
CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20  # AUTOMATIC1111's default "comma_padding_backtrack"
EMPHASIS = ("a1111", "comfy")

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_PIECE = re.compile(
    r"""(?P<escape>\\[()\[\]\\]?)          # \( \) \[ \] \\ literal; a lone backslash vanishes
      | (?P<weight>:\s*(?P<w>[+-]?[.\d]+)\s*\))  # ":1.3)" closes a round bracket with an explicit weight
      | (?P<bracket>[()\[\]])
      | (?P<text>[^\\()\[\]:]+|:)""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True)
class LoraTag:
    name: str
    unet: float  # strength on the UNet
    te: float  # strength on the text encoders (engine/sampling/text_lora.py)


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Comment lines dropped and every `<net:args>` tag removed; the `lora` ones returned in order.

    `<lora:name>` is strength 1, `<lora:name:w>` w for both, `<lora:name:te:unet>` separate, `te=`/`unet=` by name.
    """
    prompt = "\n".join(line for line in prompt.split("\n") if not line.strip().startswith("#"))
    tags = []

    def take(m: re.Match) -> str:
        if m.group(1) in ("lora", "lyco"):
            tags.append(_lora_tag(m.group(0), m.group(2).split(":")))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), tags


def _lora_tag(tag: str, args: list[str]) -> LoraTag:
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    try:
        te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
        unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
    except ValueError:
        raise PromptError(f"{tag}: strengths must be numbers") from None
    if not positional:
        raise PromptError(f"{tag}: no LoRA name")
    return LoraTag(positional[0], unet, te)


BREAK = ("BREAK", -1.0)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs as AUTOMATIC1111's parse_prompt_attention gives them; BREAK is ("BREAK", -1).

    Unclosed brackets apply to the end of the prompt, unmatched closing ones are text, adjacent runs of equal
    weight are merged. Unlike AUTOMATIC1111, BREAK inside brackets still breaks (it is not weighted).
    """
    runs: list[list] = []  # [text, weight, is_break]
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            if not run[2]:
                run[1] *= factor

    for m in _PIECE.finditer(text):
        piece = m.group(0)
        if m.group("escape") is not None:
            runs.append([piece[1:], 1.0, False])
        elif m.group("weight") is not None and open_round:
            try:
                scale(open_round.pop(), float(m.group("w")))
            except ValueError:
                raise PromptError(f"{piece!r} in {text!r}: not a number") from None
        elif piece == "(":
            open_round.append(len(runs))
        elif piece == "[":
            open_square.append(len(runs))
        elif piece == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif piece == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    runs.append([*BREAK, True])
                runs.append([part, 1.0, False])
    for start in open_round:
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)

    merged: list[list] = []
    for run in runs or [["", 1.0, False]]:
        if merged and not run[2] and not merged[-1][2] and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w, _ in merged]


def chunk_tokens(tokenizer, parsed: list[tuple[str, float]], backtrack: int = COMMA_BACKTRACK) -> list[tuple[list[int], list[float]]]:
    """(ids, weights) per 75-token chunk, unpadded: BREAK and full chunks start a new one, cut after a recent comma."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    for text, weight in parsed:
        if (text, weight) == BREAK:
            chunks.append((ids, weights))
            ids, weights, last_comma = [], [], -1
            continue
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            if token == comma:
                last_comma = len(ids)
            elif backtrack and len(ids) == CHUNK_TOKENS and last_comma != -1 and len(ids) - last_comma <= backtrack:
                cut = last_comma + 1
                chunks.append((ids[:cut], weights[:cut]))
                ids, weights, last_comma = ids[cut:], weights[cut:], -1
            if len(ids) == CHUNK_TOKENS:
                chunks.append((ids, weights))
                ids, weights, last_comma = [], [], -1
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def chunk_rows(tokenizer, chunks: list[tuple[list[int], list[float]]], count: int) -> tuple[list[int], list[float]]:
    """`count` chunks of start + ids + end + padding (77 each, empty chunks added), and the per-token weights."""
    ids_row: list[int] = []
    weight_row: list[float] = []
    for ids, weights in chunks + [([], [])] * (count - len(chunks)):
        pad = CHUNK_TOKENS + 1 - len(ids)  # the end token, then the encoder's padding
        ids_row += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (pad - 1)
        weight_row += [1.0, *weights] + [1.0] * pad
    return ids_row, weight_row


def tokenize_weighted(tokenizers: list, prompts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prompts (tags already removed) -> per tokenizer: ids (B, 77k) and weights (B, 77k), k the most chunks."""
    parsed = [parse_attention(p) for p in prompts]
    per_tok = [[chunk_tokens(tok, p) for p in parsed] for tok in tokenizers]
    count = max(len(c) for chunks in per_tok for c in chunks)
    ids, weights = [], []
    for tok, chunks in zip(tokenizers, per_tok):
        rows = [chunk_rows(tok, c, count) for c in chunks]
        ids.append(torch.tensor([r[0] for r in rows], dtype=torch.long))
        weights.append(torch.tensor([r[1] for r in rows], dtype=torch.float32))
    return ids, weights


def emphasis_a1111(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """z (B, 77, C) of one chunk and encoder times per-token weights (B, 77), rescaled to each prompt's original mean.

    A weighted mean of exactly 0 (a final layer norm without bias, as a random-init encoder has, makes every
    token's mean 0 up to rounding) keeps the scaled states instead of dividing by it."""
    scaled = z * weights[..., None].to(z.dtype)
    old, new = z.mean(dim=(1, 2), keepdim=True), scaled.mean(dim=(1, 2), keepdim=True)
    return scaled * torch.where(new == 0, torch.ones_like(new), old / new)


def emphasis_comfy(z: torch.Tensor, weights: torch.Tensor, z_empty: torch.Tensor) -> torch.Tensor:
    """(z - z_empty) w + z_empty per token, z_empty (1, 77, C) the empty prompt's encoding (ComfyUI's sd1_clip)."""
    return z_empty + (z - z_empty) * weights[..., None].to(z.dtype)


@torch.no_grad()
def encode(sd, tokenizers: list, prompts: list[str], emphasis: str = "a1111") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted prompts (tags removed) -> context (B, 77k, C), pooled (B, P) or None, from the model's encoders.

    Weights act per 77-token chunk and per encoder (the context is the encoders' states side by side); the
    pooled output is the first chunk's, unweighted, as in AUTOMATIC1111.
    """
    if emphasis not in EMPHASIS:
        raise PromptError(f"emphasis {emphasis!r}: choose one of {', '.join(EMPHASIS)}")
    device = next(sd.parameters()).device
    ids, weights = tokenize_weighted(tokenizers, prompts)
    context, pooled = sd.encode_text([t.to(device) for t in ids])
    widths = [te.width for te in sd.cfg.text_encoders]
    if sum(widths) != context.shape[-1]:
        raise PromptError(f"context width {context.shape[-1]} is not the encoders' widths {widths} side by side")
    if emphasis == "comfy":
        empty = [torch.tensor([chunk_rows(tok, [], 1)[0]], device=device) for tok in tokenizers]
        z_empty = sd.encode_text(empty)[0]  # (1, 77, C)
    parts, start = [], 0
    for w_enc, width in zip(weights, widths):
        z = context[..., start : start + width]
        out = torch.empty_like(z)
        for c in range(0, z.shape[1], CHUNK_TOKENS + 2):
            span = slice(c, c + CHUNK_TOKENS + 2)
            w = w_enc[:, span].to(device)
            if emphasis == "a1111":
                out[:, span] = emphasis_a1111(z[:, span], w)
            else:
                out[:, span] = emphasis_comfy(z[:, span], w, z_empty[..., start : start + width])
        parts.append(out)
        start += width
    return torch.cat(parts, dim=-1), pooled
