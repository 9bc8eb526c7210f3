"""Masked loss: masks from alpha channels or a mask_dir, cropped and mirrored with their images, cached beside the
latents, and a loss (and so LoRA gradients) that comes only from where the mask is one."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from gesso import models
from gesso.engine import diffusion
from gesso.engine.config.load import build_config
from gesso.engine.config.sections import LossSection
from gesso.engine.data.cache import prepare_cache
from gesso.engine.data.dataset import DatasetOptions, Sample, Subset, build_dataset
from gesso.engine.loop import objective
from gesso.engine.memory.network_setup import prepare_unet
from gesso.errors import ConfigError

AC = diffusion.scaled_linear_alphas_cumprod()
# 64x64 squares cropped at random from 128x64 images: the crop's left edge varies per image
OPTIONS = DatasetOptions(resolution=64, bucketing=False, random_crop=True, flip=True, masked_loss=True, seed=5)


def _rgba_left_clear(path, seed):
    """A 128x64 RGBA image whose left half (x < 64) is transparent: its mask is zero there."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (64, 128, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    pixels[:, :64, 3] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGBA").save(path)
    path.with_suffix(".txt").write_text("zkchar")


def _expected_columns(left: int, flipped: bool) -> torch.Tensor:
    """The mask per latent column (8 pixels each) of a crop starting at `left`: 0 where the image was clear (original
    x < 64), 1 right of it, the covered fraction in the one column the edge crosses; mirrored when flipped."""
    x = torch.arange(64) + left  # original column of each cropped pixel
    cols = (x >= 64).float().reshape(8, 8).mean(dim=1)
    return cols.flip(0) if flipped else cols


@pytest.fixture
def masked_set(tmp_path):
    for i in range(3):
        _rgba_left_clear(tmp_path / "set" / f"a{i}.png", seed=i)
    return tmp_path / "set"


def test_alpha_masks_follow_crop_and_flip_and_are_cached(masked_set, tiny, tmp_path):
    sd, tokenizers = tiny
    dataset = build_dataset([Subset(masked_set, alpha_mask=True)], OPTIONS)
    lefts = sorted(it.crop[1] for it in dataset.items)
    assert len(set(lefts)) == 3 and any(left % 8 for left in lefts)  # three crops, one cutting a latent column
    cache = prepare_cache(sd, tokenizers, dataset, "cpu", tmp_path / "cache")
    assert cache.stats.latents_encoded == 3
    flips = set()
    for epoch in (1, 2, 3):
        batches = list(cache.batches(epoch, 1, seed=1))
        for samples, (_, _, _, _, mask) in zip(dataset.epoch(epoch, 1, seed=1), batches):
            s = samples[0]
            assert mask.shape == (1, 1, 8, 8)
            expected = _expected_columns(dataset.items[s.index].crop[1], s.flipped)
            torch.testing.assert_close(mask[0, 0], expected.expand(8, 8), atol=1e-6, rtol=0)
            flips.add(s.flipped)
    assert flips == {False, True}
    files = sorted((tmp_path / "cache" / "latents").glob("*.safetensors"))
    assert len(files) == 3
    with safe_open(files[0], "pt") as f:
        assert sorted(f.keys()) == ["flipped", "latents", "mask"] and f.get_tensor("mask").shape == (1, 8, 8)
    again = prepare_cache(sd, tokenizers, build_dataset([Subset(masked_set, alpha_mask=True)], OPTIONS), "cpu",
                          tmp_path / "cache")
    assert (again.stats.latents_loaded, again.stats.latents_encoded) == (3, 0)
    for m, n in zip(cache.masks, again.masks):
        assert torch.equal(m, n)
    unmasked = prepare_cache(sd, tokenizers, build_dataset([Subset(masked_set)], dataclasses.replace(OPTIONS, masked_loss=False)),
                             "cpu", tmp_path / "cache")
    assert unmasked.stats.latents_encoded == 3  # the mask is in the key: an unmasked setting has its own files


def test_mask_dir_and_images_without_masks(tmp_path, make_image, tiny):
    sd, tokenizers = tiny
    make_image(tmp_path / "set" / "a.png", 64, 64, seed=1, caption="x")
    make_image(tmp_path / "set" / "b.png", 64, 64, seed=2, caption="x")
    grey = np.full((64, 64), 255, np.uint8)
    grey[:, :32] = 0
    (tmp_path / "masks").mkdir()
    Image.fromarray(grey, "L").save(tmp_path / "masks" / "a.png")  # b has no mask
    options = DatasetOptions(resolution=64, bucketing=False, masked_loss=True)
    dataset = build_dataset([Subset(tmp_path / "set", mask_dir=tmp_path / "masks")], options)
    assert [p.name for p, _ in dataset.unmasked] == ["b.png"]
    assert "masked loss: 1 images masked, 1 unmasked" in dataset.report()
    cache = prepare_cache(sd, tokenizers, dataset, "cpu", tmp_path / "cache")
    assert "1 images masked, 1 without a mask train unmasked" in cache.describe()
    _, mask = cache.weighting([Sample(0, False, "x"), Sample(1, False, "x")])
    torch.testing.assert_close(mask[0, 0], torch.tensor([0.0] * 4 + [1.0] * 4).expand(8, 8), atol=1e-6, rtol=0)
    assert torch.equal(mask[1], torch.ones(1, 8, 8))


def test_lora_gradients_come_only_from_the_unmasked_half(masked_set, tiny):
    sd, tokenizers = tiny
    dataset = build_dataset([Subset(masked_set, alpha_mask=True)], OPTIONS)
    cache = prepare_cache(sd, tokenizers, dataset, "cpu")
    samples = [s for b in dataset.epoch(1, 3, seed=1) for s in b]
    assert {s.flipped for s in samples} == {False, True}  # seed 1 draws both: the mask mirrors in one batch
    x0, context, y = cache.tensors(samples)
    weight, mask = cache.weighting(samples)
    unet = models.build("tiny-sdxl", seed=0).unet
    unet.requires_grad_(False)
    network, _ = prepare_unet(unet, build_config({"dataset": {"path": str(masked_set)}, "network": {"rank": 2, "alpha": 2.0}}), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for p in network.parameters():
        p.data.normal_(0, 0.1, generator=g)  # up weights off zero: every LoRA parameter gets a gradient
    d = objective.draw(x0, LossSection(), AC, torch.Generator().manual_seed(2))

    def grads(target: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """d loss / d prediction (B, 4, h, w), and d loss / d each LoRA parameter."""
        pred = unet(d.noisy, d.t, context, y)
        loss = objective.loss(pred, dataclasses.replace(d, target=target), LossSection(), AC, weight, mask)
        out = torch.autograd.grad(loss, [pred, *network.parameters()])
        return out[0], list(out[1:])

    per_pixel, base = grads(d.target)
    zero = (mask == 0).expand_as(per_pixel)
    assert zero.any() and (~zero).any()
    assert torch.count_nonzero(per_pixel[zero]) == 0  # the loss per latent pixel has no gradient where the mask is 0
    assert torch.count_nonzero(per_pixel[~zero]) == (~zero).sum()
    _, left_params = grads(torch.where(zero, d.target + 5 * torch.randn(d.target.shape, generator=g), d.target))
    for a, b in zip(base, left_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the masked-out half's targets change nothing
    _, right_params = grads(torch.where(zero, d.target, d.target + 0.5))
    assert any(not torch.allclose(a, b) for a, b in zip(base, right_params))  # the right half's do


@pytest.mark.parametrize("data", [
    {"loss": {"masked": True}},  # masked loss without a mask source
    {"dataset": {"alpha_mask": True}},  # a mask source without masked loss: kohya would mask, we say so
    {"dataset": {"subsets": [{"path": "x", "mask_dir": "m"}]}},
])
def test_mask_keys_need_each_other(data, tmp_path):
    with pytest.raises(ConfigError, match="loss.masked, dataset.alpha_mask, dataset.mask_dir"):
        build_config(data)
    for folder in ("x", "m"):
        (tmp_path / folder).mkdir()
    dataset = {"path": ".", **data.get("dataset", {"alpha_mask": True})}
    build_config({**data, "loss": {"masked": True}, "dataset": dataset}, base=tmp_path)
