import io

import numpy as np
import torch
from PIL import Image

from gesso.engine.data.cache import prepare_cache
from gesso.engine.data.dataset import DatasetOptions, Subset, build_dataset, load_pixels

OPTIONS = DatasetOptions(resolution=64, min_bucket_side=64, max_bucket_side=128)


def _rgb(h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _messy_folder(root):
    """Every Pillow mode the brief lists, an EXIF-rotated JPEG, and files that must be skipped."""
    root.mkdir()
    palette = Image.fromarray(_rgb(seed=1)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(root / "p.png")
    transparent = Image.fromarray(_rgb(seed=2)).convert("P", palette=Image.Palette.ADAPTIVE)
    transparent.save(root / "p_transparent.png", transparency=0)
    la = np.stack([np.full((64, 64), 40, np.uint8), np.zeros((64, 64), np.uint8)], -1)
    la[:, 32:, 1] = 255  # right half opaque, left half fully transparent
    Image.fromarray(la).save(root / "la.png")
    rgba = np.concatenate([_rgb(seed=3), np.full((64, 64, 1), 255, np.uint8)], -1)
    rgba[:32, :, 3] = 0  # top half fully transparent
    Image.fromarray(rgba).save(root / "rgba.webp", lossless=True)
    Image.fromarray(_rgb(seed=4)).convert("CMYK").save(root / "cmyk.jpg")
    grey16 = np.zeros((64, 64), np.uint16)
    grey16[:, 32:] = 65535
    Image.fromarray(grey16).save(root / "grey16.png")
    Image.fromarray(_rgb(seed=5)).convert("1").save(root / "bilevel.png")
    Image.fromarray(_rgb(seed=6)).convert("L").save(root / "grey.jpeg")
    stored = np.zeros((64, 96, 3), np.uint8)  # stored 96 wide, 64 high: left half red, right half blue
    stored[:, :48, 0] = 255
    stored[:, 48:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(root / "rotated.jpg", exif=exif, quality=95)
    good = io.BytesIO()
    Image.fromarray(_rgb(seed=7)).save(good, "PNG")
    (root / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "notes.png").write_text("this is not an image\n")
    (root / "empty.webp").write_bytes(b"")
    (root / "p.txt").write_text("palette, trained")
    (root / "la.txt").write_text("  \n")  # empty
    (root / "rgba.txt").write_bytes("café, rgba".encode("latin-1"))  # not UTF-8
    (root / "cmyk.caption").write_text("cmyk, second extension")


VALID = {"p.png", "p_transparent.png", "la.png", "rgba.webp", "cmyk.jpg", "grey16.png", "bilevel.png", "grey.jpeg", "rotated.jpg"}
BROKEN = {"truncated.png", "notes.png", "empty.webp"}


def test_every_valid_image_trains_and_broken_ones_are_named(tmp_path, tiny):
    root = tmp_path / "messy"
    _messy_folder(root)
    dataset = build_dataset([Subset(root, trigger="zzk")], OPTIONS)
    assert {it.path.name for it in dataset.items} == VALID
    assert {p.name for p, _ in dataset.skipped} == BROKEN
    report = dataset.report()
    for name in BROKEN:
        assert str(root / name) in report
    why = {p.name: reason for p, reason in dataset.skipped}
    assert "not an image" in why["notes.png"] and "empty" in why["empty.webp"] and "broken" in why["truncated.png"]

    captions = {it.path.name: it.caption for it in dataset.items}
    assert captions["p.png"] == "zzk, palette, trained"
    assert captions["la.png"] == captions["grey16.png"] == "zzk"  # empty and missing captions: the trigger alone
    assert captions["rgba.webp"] == "zzk, caf\ufffd, rgba"
    assert captions["cmyk.jpg"] == "zzk, cmyk, second extension"
    problems = {p.name: reason for p, reason in dataset.caption_problems}
    assert "not UTF-8" in problems["rgba.txt"] and "empty" in problems["la.txt"] and "no caption" in problems["grey16.png"]
    assert str(root / "rgba.txt") in report

    sd, tokenizers = tiny
    cache = prepare_cache(sd, tokenizers, dataset, "cpu", tmp_path / "cache")
    assert cache.stats.latents_encoded == len(VALID) and all(torch.isfinite(x).all() for x in cache.latents)
    steps = list(cache.batches(1, 4, seed=0))
    assert sum(x.shape[0] for x, *_ in steps) == len(VALID)


def test_modes_decode_to_the_right_pixels(tmp_path):
    root = tmp_path / "messy"
    _messy_folder(root)
    items = {it.path.name: it for it in build_dataset([Subset(root)], OPTIONS).items}
    rgba = load_pixels(items["rgba.webp"])  # (3, 64, 64) in [-1, 1]
    assert torch.equal(rgba[:, :32], torch.ones(3, 32, 64))  # transparent over white
    assert not torch.equal(rgba[:, 32:], torch.ones(3, 32, 64))
    la = load_pixels(items["la.png"])
    assert torch.equal(la[:, :, :32], torch.ones(3, 64, 32))
    torch.testing.assert_close(la[:, :, 32:], torch.full((3, 64, 32), 40 / 127.5 - 1))
    grey16 = load_pixels(items["grey16.png"])  # 0 and 65535 are black and white, not rescaled by the maximum
    assert torch.equal(grey16[:, :, :32], -torch.ones(3, 64, 32)) and torch.equal(grey16[:, :, 32:], torch.ones(3, 64, 32))

    rotated = items["rotated.jpg"]
    assert rotated.original_size == (96, 64)  # upright: 64 wide, 96 high
    assert rotated.bucket == (64, 64) and rotated.crop == (16, 0)  # the only 64 px bucket; (96 - 64) // 2 rows cut on top
    pixels = load_pixels(rotated)
    top, bottom = pixels[:, :32].mean((1, 2)), pixels[:, -32:].mean((1, 2))
    assert top[0] > 0.8 and top[2] < -0.8 and bottom[2] > 0.8 and bottom[0] < -0.8  # red on top after rotating clockwise
