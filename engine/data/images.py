"""Image files as artists leave them, decoded to upright 8-bit RGB.

Every Pillow mode is accepted: palette and grey images are expanded, transparency is composited over
white, 16-bit grey is scaled from 0..65535, CMYK is converted, and EXIF orientation is applied first so
the stored size is the size the artist sees. A file that Pillow cannot decode completely raises
BadImage with a short reason; the dataset skips it and names it in its report.
"""
import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class BadImage(Exception):
    """A file that is not an image or cannot be decoded to the end; the message says which."""


def _upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a malformed EXIF block must not cost the image: keep it as stored
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB; alpha composited over white."""
    if im.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(im, dtype=np.float64) / 257.0  # 16-bit grey (Pillow opens it as I;16 or I)
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        im = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def decode(data: bytes) -> Image.Image:
    """Bytes of a file -> upright RGB image, or BadImage naming why not."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF noise: the image is still usable
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # decode to the end: a truncated file fails here, not mid-training
                return to_rgb(_upright(im))
    except UnidentifiedImageError:
        raise BadImage("not an image (Pillow cannot identify it)") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"broken image ({e})") from None


def to_pixels(im: Image.Image) -> torch.Tensor:
    """RGB image -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
