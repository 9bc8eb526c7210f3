import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from gesso import models
from gesso.engine.data.cache import encode_captions, prepare_cache
from gesso.engine.data.dataset import Sample, Subset, build_dataset
from gesso.models.files import read_safetensors

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
    changed, seen = _run(root, small, counted)
    # b is encoded again in its batch, beside a (cache.fixed_batches: the bits a cache filled at once gives)
    assert seen == {"images": 2, "captions": 0}
    assert (changed.stats.latents_encoded, changed.stats.latents_loaded) == (1, 2)
    assert torch.equal(changed.latents[0], first.latents[0])  # a's cached latents stay

    (root / "a.txt").write_text("red square, new tag")
    changed, seen = _run(root, small, counted)
    assert seen == {"images": 0, "captions": 3}  # in its batch of one-chunk captions, beside "" and "blue square"
    assert (changed.stats.texts_encoded, changed.stats.texts_loaded) == (1, 3)

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
    damaged, seen = _run(root, small, counted, tmp_path / "cache")
    assert (damaged.stats.latents_encoded, damaged.stats.rejected, seen["captions"]) == (1, 1, 0)

    sd, tokenizers, seen = counted
    other = models.build("tiny-sdxl", seed=1)
    cache = prepare_cache(other, tokenizers, build_dataset([Subset(root)], small), "cpu", tmp_path / "cache")
    assert (cache.stats.latents_encoded, cache.stats.texts_encoded) == (3, 4)


def test_a_cache_filled_in_two_goes_holds_the_bits_of_one_filled_at_once(tmp_path, make_image, small, counted):
    # six 64 px images in one bucket, encoder batches of 4 (images 0-3, then 4-5): a run killed while caching left
    # every file but image 2's and caption 2's, and the next one encodes them in their own batches again. Alone (a
    # batch of 1) the tiny VAE's latents at 64 px differ from those of a batch of 4 in the last bits.
    root, options = tmp_path / "set", dataclasses.replace(small, resolution=64)
    for i in range(6):
        make_image(root / f"{i}.png", 64, 64, seed=i, caption=f"shape {i}")
    at_once, _ = _run(root, options, counted, tmp_path / "at_once")
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "at_once", cut)
    for victim in cut.rglob("*.safetensors"):
        source = json.loads(read_safetensors(victim)[1]["gesso_cache"])["source"]
        if source in (str(root / "2.png"), "shape 2"):
            victim.unlink()
    resumed, seen = _run(root, options, counted, cut)
    assert (resumed.stats.latents_encoded, resumed.stats.texts_encoded) == (1, 1)
    assert seen["images"] == 4  # image 2 with its batch
    assert all(torch.equal(x, y) for x, y in zip(at_once.latents, resumed.latents))
    assert at_once.text.keys() == resumed.text.keys()
    assert all(torch.equal(at_once.text[c][0], resumed.text[c][0]) and torch.equal(at_once.text[c][1], resumed.text[c][1])
               for c in at_once.text)


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
