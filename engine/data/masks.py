"""Loss masks (kohya's masked loss): where in an image the loss counts, as a weight in [0, 1] per latent pixel.

A mask is an image's own alpha channel (a subset's `alpha_mask`) or the red channel of a same-named image in the
subset's `mask_dir` (kohya's `conditioning_data_dir`; a grey or black-and-white mask reads the same). It is resized
and cropped exactly as the image's pixels are, then averaged over each latent pixel's 8x8 pixels (kohya's "area"
interpolation), and cached with the latents. A flip mirrors it exactly: bucket sides are multiples of 64, so
averaging and mirroring commute. An image without a mask trains unmasked (a mask of ones).
"""
import hashlib
from pathlib import Path

import torch
from PIL import Image

from gesso.engine.data.buckets import Size
from gesso.engine.data.images import IMAGE_EXTENSIONS, BadImage, mask_channel, open_upright

ALPHA = "alpha"  # an Item's mask_digest when its mask is its own alpha channel


def mask_files(folder: str | Path) -> dict[str, Path]:
    """{image stem: mask file} of a mask folder; FileNotFoundError naming it when it is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"mask_dir not found: {folder}")
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")}


def check_mask_file(path: Path, image_size: Size) -> str:
    """sha256 of a mask file that fits its image, else raises BadImage saying why it cannot mask it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadImage(f"mask {path} unreadable ({e.strerror or e})") from None
    try:
        _, size = open_upright(data)
    except BadImage as e:
        raise BadImage(f"mask {path}: {e}") from None
    if size != image_size:
        raise BadImage(f"mask {path} is {size[1]}x{size[0]}, the image {image_size[1]}x{image_size[0]}: it must be the same size")
    return hashlib.sha256(data).hexdigest()


def load_mask(path: Path, alpha: bool, resized: Size, crop: Size, bucket: Size, factor: int) -> torch.Tensor:
    """(1, bucket h / factor, bucket w / factor) float32 in [0, 1]: the mask resized, cropped and averaged as the
    image's pixels are encoded. alpha: read the file's alpha channel, else its red channel."""
    im, _ = open_upright(path.read_bytes())
    grey = mask_channel(im, alpha)
    (rh, rw), (top, left), (bh, bw) = resized, crop, bucket
    grey = grey.resize((rw, rh), Image.Resampling.LANCZOS).crop((left, top, left + bw, top + bh))
    full = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).reshape(1, 1, bh, bw).float() / 255.0
    return torch.nn.functional.interpolate(full, size=(bh // factor, bw // factor), mode="area")[0]
