import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from gesso import models
from gesso.engine.data.cache import encode_captions, prepare_cache
from gesso.engine.data.dataset import Sample, Subset, build_dataset

LONG = ", ".join(f"tag{i}" for i in range(60))  # over 75 tokens: several 77-token chunks


@pytest.fixture
def counted(tiny, monkeypatch):
    """The tiny model with its VAE and text encoders counting the images and captions they see."""
    sd, tokenizers = tiny
    seen = {"images": 0, "captions": 0}
    encode_images, encode_text = sd.encode_images, sd.encode_text

    def count_images(pixels):
        seen["images"] += pixels.shape[0]
        return encode_images(pixels)

    def count_text(tokens):
        seen["captions"] += tokens[0].shape[0]
        return encode_text(tokens)

    monkeypatch.setattr(sd, "encode_images", count_images)
    monkeypatch.setattr(sd, "encode_text", count_text)
    return sd, tokenizers, seen


def _folder(root, make_image):
    make_image(root / "a.png", 64, 64, seed=1, caption="red square")
    make_image(root / "b.png", 80, 64, seed=2, caption="blue square")
    make_image(root / "c.png", 192, 64, seed=3, caption=LONG)


def _run(root, options, counted, cache_dir=None, **kw):
    sd, tokenizers, seen = counted
    seen.update(images=0, captions=0)
    cache = prepare_cache(sd, tokenizers, build_dataset([Subset(root)], options), "cpu", cache_dir, **kw)
    return cache, dict(seen)


def test_second_run_hits_and_each_change_misses_only_what_changed(tmp_path, make_image, small, counted):
    root = tmp_path / "set"
    _folder(root, make_image)
    first, seen = _run(root, small, counted)
    assert seen == {"images": 3, "captions": 4}  # three captions and the empty one used as padding
    assert len(list((root / ".gesso_cache" / "latents").glob("*.safetensors"))) == 3

    again, seen = _run(root, small, counted)
    assert seen == {"images": 0, "captions": 0}
    assert (again.stats.latents_loaded, again.stats.texts_loaded) == (3, 4)
    for x, y in zip(first.latents, again.latents):
        assert torch.equal(x, y)
    for (x0, c0, y0, *_), (x1, c1, y1, *_) in zip(first.batches(1, 2, seed=3), again.batches(1, 2, seed=3)):
        assert torch.equal(x0, x1) and torch.equal(c0, c1) and torch.equal(y0, y1)

    fixed = list(again.fixed_batches(2))  # a and b share the square bucket, c is alone
    assert sorted(x.shape[0] for x, _, _ in fixed) == [1, 2]
    assert sorted(x.shape[-1] for x, _, _ in fixed) == [16, 24]

    pixels = np.asarray(Image.open(root / "b.png")).copy()
    pixels[0, 0] ^= 1  # one bit of one pixel
    Image.fromarray(pixels).save(root / "b.png")
    _, seen = _run(root, small, counted)
    assert seen == {"images": 1, "captions": 0}

    (root / "a.txt").write_text("red square, new tag")
    _, seen = _run(root, small, counted)
    assert seen == {"images": 0, "captions": 1}

    _, seen = _run(root, dataclasses.replace(small, resolution=64), counted)
    assert seen["images"] == 3
    _, seen = _run(root, dataclasses.replace(small, flip=True), counted)
    assert seen["images"] == 3 * 2  # each image and its mirror


def test_another_model_or_a_corrupt_file_is_a_miss(tmp_path, make_image, small, counted):
    root = tmp_path / "set"
    _folder(root, make_image)
    _run(root, small, counted, tmp_path / "cache")
    victim = sorted((tmp_path / "cache" / "latents").glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:50])
    _, seen = _run(root, small, counted, tmp_path / "cache")
    assert seen == {"images": 1, "captions": 0}

    sd, tokenizers, seen = counted
    other = models.build("tiny-sdxl", seed=1)
    cache = prepare_cache(other, tokenizers, build_dataset([Subset(root)], small), "cpu", tmp_path / "cache")
    assert (cache.stats.latents_encoded, cache.stats.texts_encoded) == (3, 4)


def test_cached_text_pads_like_encoding_the_batch_together(tmp_path, make_image, small, counted):
    root = tmp_path / "set"
    make_image(root / "a.png", 64, 64, seed=1, caption="red square")
    make_image(root / "b.png", 80, 64, seed=2, caption=LONG)  # same bucket as a.png
    cache, _ = _run(root, small, counted)
    sd, tokenizers, _ = counted
    captions = ["red square", LONG]  # one chunk and two: the cached one is padded with the empty prompt's chunk
    index = {it.caption: i for i, it in enumerate(cache.dataset.items)}
    _, context, y = cache.tensors([Sample(index[c], False, c) for c in captions])
    with torch.no_grad():
        together, pooled = encode_captions(sd, tokenizers, captions)
    assert context.shape == together.shape and together.shape[1] > 77
    torch.testing.assert_close(context, together, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:, : pooled.shape[1]], pooled, rtol=1e-5, atol=1e-5)


def test_caption_augmentation_turns_the_text_cache_off_and_encodes_each_batch(tmp_path, make_image, small, counted, caplog):
    root = tmp_path / "set"
    _folder(root, make_image)
    options = dataclasses.replace(small, shuffle_caption=True, keep_tokens=1)
    with caplog.at_level(logging.WARNING, "gesso.cache"):
        cache, seen = _run(root, options, counted)
    assert cache.text is None and seen["captions"] == 0
    assert [r.getMessage() for r in caplog.records if "text cache off" in r.getMessage()] == [
        "text cache off: caption shuffle/dropout changes captions every step, so captions are encoded per batch"]
    sd, tokenizers, seen = counted
    for samples in cache.dataset.epoch(1, 2, seed=0):
        _, context, _ = cache.tensors(samples)
        with torch.no_grad():
            expected, _ = encode_captions(sd, tokenizers, [s.caption for s in samples])
        torch.testing.assert_close(context, expected, rtol=0, atol=0)
    long_caption = next(s.caption for b in cache.dataset.epoch(1, 2, seed=0) for s in b if s.caption.startswith("tag0"))
    assert long_caption != LONG and sorted(long_caption.split(", ")) == sorted(LONG.split(", "))
