"""Datasets as artists prepare them: a folder of images with same-named caption files.

Each image is loaded once (EXIF orientation applied, any mode converted to RGB over white), resized so
its shorter side is the training resolution and centre-cropped to a square; the original size and
the crop offset are kept for SDXL's size conditioning.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str


@dataclass(frozen=True)
class Prepared:
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before resizing
    crop: tuple[int, int]  # (top, left) of the crop, in resized pixels


def read_caption(image: Path, extension: str, trigger: str) -> str:
    """The image's caption with the trigger word first; a missing or unreadable caption is just the trigger."""
    path = image.with_suffix(extension)
    try:
        caption = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        caption = ""
    if trigger and trigger not in caption:
        caption = f"{trigger}, {caption}" if caption else trigger
    return caption


def scan(folder: str | Path, extension: str = ".txt", trigger: str = "") -> list[Item]:
    """Images of `folder` (sorted, so runs are reproducible) with their captions."""
    images = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    return [Item(p, read_caption(p, extension, trigger)) for p in images]


def load_rgb(path: Path) -> Image.Image:
    """Any mode, bit depth or orientation to upright 8-bit RGB; transparency composited over white."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, im).convert("RGB")
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            im = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8))
        return im.convert("RGB")


def prepare(path: Path, resolution: int) -> Prepared:
    """Resize the shorter side to `resolution` and centre-crop a square."""
    im = load_rgb(path)
    w, h = im.size
    scale = resolution / min(w, h)
    rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    im = im.resize((rw, rh), Image.Resampling.LANCZOS)
    top, left = (rh - resolution) // 2, (rw - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return Prepared(pixels, (h, w), (top, left))
