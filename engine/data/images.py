"""Image files as artists leave them, decoded to upright 8-bit RGB in bounded memory.

Every Pillow mode is accepted: palette and grey images are expanded, transparency is composited over
white, 16-bit grey is scaled from 0..65535, CMYK is converted, and EXIF orientation is applied first so
the stored size is the size the artist sees. A file that Pillow cannot decode completely raises
BadImage with a short reason; the dataset skips it and names it in its report.

Huge files: a JPEG is reduced while decoding (libjpeg's DCT scaling by 1/2, 1/4 or 1/8) as far as it
still covers the size it is resized to, so a 12000x12000 photo decodes at 1500x1500 for a 1024 bucket.
Other formats cannot be reduced before they are whole; any image that would still decode to more than
MAX_PIXELS is skipped from its header alone, before a byte of it is decoded. Decodes above LARGE_PIXELS
take turns, so the dataset scan's threads never hold several large images at once.
"""
import io
import threading
import warnings
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from gesso.engine.data.buckets import Size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# 8192x8192, any 61 MP camera frame: Pillow holds RGB in 4 bytes a pixel, so 256 MiB decoded (512 MiB while
# transparency is composited). Below Pillow's own warning (89.5 MP); it refuses files over 179 MP.
MAX_PIXELS = 8192 * 8192
LARGE_PIXELS = MAX_PIXELS // 8  # eight scan threads below this hold no more than one image at the limit
GREY_16_TO_8 = np.rint(np.arange(65536) / 257.0).astype(np.uint8)
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_large_decode = threading.Lock()


class BadImage(Exception):
    """A file that is not an image or cannot be decoded to the end; the message says which."""


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a malformed EXIF block must not cost the image: keep it as stored
        return 1


def _upright(im: Image.Image) -> Image.Image:
    if _orientation(im) == 1:
        return im  # exif_transpose would copy it: a second full-size image for nothing
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a malformed EXIF block must not cost the image: keep it as stored
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB; alpha composited over white."""
    if im.mode in SIXTEEN_BIT_MODES:  # 16-bit grey (Pillow opens it as I;16 or I), looked up, not divided in floats
        im = Image.fromarray(GREY_16_TO_8[np.clip(np.asarray(im), 0, 65535)], "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        im = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
    if has_alpha(im):
        im = im if im.mode == "RGBA" else im.convert("RGBA")
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(im, mask=im)  # the same pixels as alpha_composite over white, in two full-size images, not four
        return out
    return im if im.mode == "RGB" else im.convert("RGB")


def _upright_size(stored: tuple[int, int], im: Image.Image) -> Size:
    """(h, w) as the artist sees the file stored (w, h). A PNG's EXIF may follow its pixels: Pillow decodes it
    to read the EXIF, so call this on a PNG only after the pixel limit is checked."""
    return stored if _orientation(im) in TRANSPOSED else (stored[1], stored[0])


def _too_large(stored: tuple[int, int], im: Image.Image) -> BadImage:
    reduced = f", {im.width}x{im.height} once reduced while decoding," if im.size != stored else ""
    return BadImage(f"too large: {stored[0]}x{stored[1]} pixels{reduced} over the decoding limit of "
                    f"{MAX_PIXELS} (8192x8192); see README, [dataset]")


def open_upright(data: bytes, target: Callable[[Size], Size] | None = None) -> tuple[Image.Image, Size]:
    """Bytes of a file -> (upright image, decoded to the end in its own mode, upright (h, w) of the file), or
    BadImage naming why not.

    target: maps the file's upright size to the (h, w) the image will be resized to; a JPEG is reduced while
    decoding as far as it still covers that, so the image returned can be smaller than the file.
    """
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF noise: the limit below is ours
            im = Image.open(io.BytesIO(data))  # the header only
            stored = im.size  # (w, h)
            if target is not None and isinstance(im, JpegImagePlugin.JpegImageFile):  # its EXIF is read without decoding
                h, w = target(_upright_size(stored, im))
                im.draft(None, (h, w) if _orientation(im) in TRANSPOSED else (w, h))
            if im.width * im.height > MAX_PIXELS:
                raise _too_large(stored, im)
            with _large_decode if im.width * im.height > LARGE_PIXELS else nullcontext():
                im.load()  # decode to the end: a truncated file fails here, not mid-training
                return _upright(im), _upright_size(stored, im)
    except UnidentifiedImageError:
        raise BadImage("not an image (Pillow cannot identify it)") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large for Pillow to open ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"broken image ({e})") from None


def decode(data: bytes, target: Callable[[Size], Size] | None = None) -> tuple[Image.Image, Size]:
    """Bytes of a file -> (upright RGB image, upright (h, w) of the file), or BadImage; `target` as open_upright's."""
    im, size = open_upright(data, target)
    try:
        return to_rgb(im), size
    except (OSError, ValueError) as e:
        raise BadImage(f"broken image ({e})") from None


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ALPHA_MODES or (im.mode == "P" and "transparency" in im.info)


def mask_channel(im: Image.Image, alpha: bool) -> Image.Image:
    """An upright image's loss mask as 8-bit grey: its alpha channel (kohya's alpha_mask), or for a mask file its red
    channel, as kohya reads a mask from conditioning_data_dir (grey and black-and-white masks are the same)."""
    if alpha:
        return im.convert("RGBA").getchannel("A")
    return to_rgb(im).getchannel("R")


def to_pixels(im: Image.Image) -> torch.Tensor:
    """RGB image -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
