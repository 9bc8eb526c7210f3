"""Caption files and the caption-level augmentations kohya's users know.

A caption is the first non-empty line of `<image stem>.txt` (or `.caption`), as in sd-scripts. A caption
that is missing, empty or not UTF-8 never stops training: the image trains with what is left (at least
the trigger word) and the problem is returned so the dataset report can name the file.
"""
import re
from pathlib import Path

import torch

CAPTION_EXTENSIONS = (".txt", ".caption")
BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _decode(data: bytes) -> tuple[str, str | None]:
    for bom, encoding in BOMS:
        if data.startswith(bom):
            return data.decode(encoding, errors="replace"), None
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), "caption is not UTF-8 (decoded with replacement characters)"


def read_caption(image: Path, extension: str = ".txt") -> tuple[str, Path | None, str | None]:
    """(caption, caption file or None, problem or None) for an image; `extension` is tried before the others."""
    for ext in (extension, *(e for e in CAPTION_EXTENSIONS if e != extension)):
        path = image.with_suffix(ext)
        if not path.is_file():
            continue
        try:
            text, problem = _decode(path.read_bytes())
        except OSError as e:
            return "", path, f"caption unreadable ({e.strerror or e})"
        line = next((s.strip() for s in text.splitlines() if s.strip()), "")
        return line, path, problem or (None if line else "caption is empty")
    return "", None, "no caption file"


def with_trigger(caption: str, trigger: str) -> str:
    """`trigger, caption` unless the caption already holds the trigger as a whole word or phrase."""
    if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def augment(caption: str, shuffle: bool, keep_tokens: int, dropout_rate: float, generator: torch.Generator) -> str:
    """kohya's caption augmentation: drop the whole caption with `dropout_rate` (unconditional training), else
    shuffle the comma-separated tags after the first `keep_tokens`. Draws from `generator` only when an option is on."""
    if dropout_rate > 0 and float(torch.rand((), generator=generator)) < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    return ", ".join(kept + [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()])
