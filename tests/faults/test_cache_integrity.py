"""A damaged, stale or foreign cache file is named, encoded again and rewritten; it is never trained on.

The reference is one undamaged demo run (12 images, 3 steps) with a fresh cache. Each case damages one file of
a copy of that cache and trains again: the notice must name the file, the rebuilt file must equal the
undamaged one byte for byte (the tiny VAE on one CPU thread encodes an image alone exactly as in a batch), the
LoRA must equal the reference tensor for tensor, and every other file must be untouched.
"""
import logging
import shutil

import pytest
import torch
from faults_testutil import DEMO, ROOT, assert_unchanged, gesso_cli, snapshot, temp_litter
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gesso import models
from gesso.engine.config.load import load_config
from gesso.engine.data.cache import cache_metadata, prepare_cache
from gesso.engine.data.dataset import DatasetOptions, Subset, build_dataset, load_pixels
from gesso.engine.loop.train import train
from gesso.engine.lora.files import read_lora
from gesso.errors import TrainError

OVERRIDES = ["train.epochs=1", "dataset.repeats=1", "sample.prompts=[]", "output.tensorboard=false"]


def config(cache):
    return load_config(DEMO, [*OVERRIDES, f"dataset.cache_dir='{cache}'"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(cache folder, output folder, LoRA tensors, losses) of an undamaged run with a fresh cache."""
    root = tmp_path_factory.mktemp("reference")
    result = train(config(root / "cache"), root / "out", progress=False)
    assert result.losses and all(torch.isfinite(torch.tensor(result.losses)))
    return root / "cache", root / "out", read_lora(result.final)[0], result.losses


def _rewrite(path, tensors, metadata):
    path.unlink()
    save_file(tensors, path, metadata)


def _flip_middle(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the tensor bytes: the header is a few hundred bytes of a 4.4 kB file
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def _valid_file(fill, consistent):
    """Damage that still reads as a safetensors file: the tensors filled by `fill`, with the original metadata
    (its checksums now wrong) or, `consistent`, with metadata recomputed for the new tensors (as a file written
    by a buggy run, or for another resolution, would carry)."""
    def damage(path):
        with safe_open(path, "pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        tensors = {k: fill(v) for k, v in tensors.items()}
        _rewrite(path, tensors, cache_metadata(tensors, "forged") if consistent else metadata)
    return damage


def _older_format(path):
    _rewrite(path, load_file(path), {"source": "an older Gesso"})


DAMAGE = {
    # kind: (folder, damage, what the notice says)
    "flipped bytes": ("latents", _flip_middle, "does not match its checksum"),
    "truncated": ("latents", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "unreadable"),
    "overwritten with zeros": ("latents", lambda p: p.write_bytes(bytes(p.stat().st_size)), "unreadable"),
    "zero tensors": ("latents", _valid_file(torch.zeros_like, consistent=False), "does not match its checksum"),
    "NaN tensors, checksums matching": ("latents", _valid_file(lambda t: torch.full_like(t, float("nan")), True), "NaN or inf"),
    "another resolution": ("latents", _valid_file(lambda t: torch.randn(t.shape[0], 24, 24), True), "(4, 24, 24)"),
    "older format": ("latents", _older_format, "no checksums"),
    "text, flipped bytes": ("text", _flip_middle, "does not match its checksum"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_cache_file_is_named_rebuilt_and_never_trained_on(tmp_path, reference, kind, caplog):
    ref_cache, ref_out, ref_lora, ref_losses = reference
    folder, damage, why = DAMAGE[kind]
    cache = tmp_path / "cache"
    shutil.copytree(ref_cache, cache)
    victim = sorted((cache / folder).glob("*.safetensors"))[5]
    undamaged = victim.read_bytes()
    damage(victim)
    assert victim.read_bytes() != undamaged
    before = {p: b for p, b in (snapshot(cache) | snapshot(ref_out)).items() if p != victim}

    with caplog.at_level(logging.WARNING, logger="gesso.cache"):
        result = train(config(cache), tmp_path / "out", progress=False)

    notices = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(notices) == 1 and str(victim) in notices[0] and why in notices[0], notices
    assert_unchanged(before)
    assert temp_litter(cache) == []
    if folder == "latents":
        assert victim.read_bytes() == undamaged  # rebuilt as a fresh cache has it
        assert result.losses == ref_losses
        lora = read_lora(result.final)[0]
        assert lora.keys() == ref_lora.keys() and all(torch.equal(lora[k], ref_lora[k]) for k in lora)
    else:  # a caption encoded alone, not in the batch of 13: equal up to the last float bits
        with safe_open(victim, "pt") as new, safe_open(ref_cache / folder / victim.name, "pt") as old:
            assert new.keys() == old.keys()
            for k in new.keys():
                torch.testing.assert_close(new.get_tensor(k), old.get_tensor(k), rtol=1e-5, atol=1e-5)
        # the loss, not the LoRA: Adam divides by the gradients' size, so last-bit differences in near-zero
        # gradients move some LoRA weights by up to its step size
        torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gesso.cache"):
        again = train(config(cache), tmp_path / "again", progress=False)
    assert not [r for r in caplog.records if "rejected" in r.getMessage()]  # the rebuilt file passes its checks
    assert again.losses == result.losses


@pytest.mark.slow
def test_cli_names_the_damaged_file_and_trains(tmp_path, reference):
    ref_cache, ref_out, ref_lora, ref_losses = reference
    cache = tmp_path / "cache"
    shutil.copytree(ref_cache, cache)
    victim = sorted((cache / "latents").glob("*.safetensors"))[0]
    undamaged = victim.read_bytes()
    _flip_middle(victim)
    before = {p: b for p, b in (snapshot(cache) | snapshot(DEMO.parent)).items() if p != victim}
    args = [f"--set={o}" for o in [*OVERRIDES, f"dataset.cache_dir='{cache}'"]]
    proc = gesso_cli("train", DEMO, "--output-dir", tmp_path / "out", *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert f"cache file {victim} rejected" in proc.stderr
    assert "1 damaged or stale files encoded again" in proc.stdout
    assert victim.read_bytes() == undamaged
    assert_unchanged(before)
    lora = read_lora(tmp_path / "out" / "demo.safetensors")[0]
    assert all(torch.equal(lora[k], ref_lora[k]) for k in ref_lora)


@pytest.fixture(scope="module")
def tiny():
    sd = models.build("tiny-sdxl", seed=0)
    sd.requires_grad_(False)
    return sd, models.load_tokenizers(sd.cfg)


def test_latents_that_are_not_finite_after_encoding_are_skipped_not_cached(tmp_path, tiny, monkeypatch, caplog):
    sd, tokenizers = tiny
    options = DatasetOptions(resolution=128)
    dataset = build_dataset([Subset(DEMO.parent / "demo")], options)
    victim = dataset.items[4]
    overflowing = load_pixels(victim)
    encode = sd.encode_images

    def vae_overflowing_on_victim(pixels):  # as an fp16 VAE does on some images
        latents = encode(pixels)
        for row in range(len(pixels)):
            if torch.equal(pixels[row], overflowing):
                latents[row] = float("inf")
        return latents

    monkeypatch.setattr(sd, "encode_images", vae_overflowing_on_victim)
    with caplog.at_level(logging.WARNING, logger="gesso.cache"):
        cache = prepare_cache(sd, tokenizers, dataset, "cpu", tmp_path / "cache")
    warnings = [r.getMessage() for r in caplog.records if str(victim.path) in r.getMessage()]
    assert len(warnings) == 1 and "not finite" in warnings[0]
    assert victim not in cache.dataset.items and len(cache.latents) == 11
    assert all(torch.isfinite(x).all() for x in cache.latents)
    assert str(victim.path) in cache.dataset.report()
    assert len(list((tmp_path / "cache" / "latents").glob("*.safetensors"))) == 11

    monkeypatch.setattr(sd, "encode_images", encode)
    healed = prepare_cache(sd, tokenizers, build_dataset([Subset(DEMO.parent / "demo")], options), "cpu", tmp_path / "cache")
    assert (healed.stats.latents_encoded, healed.stats.latents_loaded) == (1, 11)  # the victim was never cached

    monkeypatch.setattr(sd, "encode_images", lambda pixels: encode(pixels) * float("nan"))
    with pytest.raises(TrainError, match="every image was skipped while caching, the first .*00.png: the VAE's latents"):
        prepare_cache(sd, tokenizers, build_dataset([Subset(DEMO.parent / "demo")], options), "cpu", tmp_path / "other")
