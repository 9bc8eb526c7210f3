import dataclasses
from collections import Counter

import torch

from gesso.engine.data import buckets as B
from gesso.engine.data.cache import encode_latents, prepare_cache
from gesso.engine.data.dataset import Subset, build_dataset, load_pixels

# Hand-worked placements at resolution 128 (buckets listed in conftest), sizes as (h, w):
# square   100x100: ratio 1 -> 128x128, scale 1.28, resized 128x128, crop (0, 0)
# wide     330x100: ratio 3.3 -> 64x192 (|ln 3.3/3| < |ln 3.3/4|), scale max(192/330, 64/100) = 0.64,
#                   resized 64 x round(211.2) = 211, crop left (211 - 192) // 2 = 9; mirrored: 211 - 9 - 192 = 10
# portrait  90x120: ratio 0.75 -> 128x128, scale 128/90, resized round(170.67) = 171 x 128, crop top 21; mirrored left 0
# tall      70x260: ratio 0.269 -> 256x64 (|ln .269/.25| < |ln .269/.333|), scale 256/260, resized 256 x round(68.92) = 69,
#                   crop left (69 - 64) // 2 = 2; mirrored: 69 - 2 - 64 = 3
IMAGES = {"square.png": (100, 100), "wide.png": (330, 100), "portrait.png": (90, 120), "tall.png": (70, 260)}  # (w, h)
EXPECTED = {  # name: (original (h, w), bucket (h, w), crop (top, left), mirrored crop)
    "square.png": ((100, 100), (128, 128), (0, 0), (0, 0)),
    "wide.png": ((100, 330), (64, 192), (0, 9), (0, 10)),
    "portrait.png": ((120, 90), (128, 128), (21, 0), (21, 0)),
    "tall.png": ((260, 70), (256, 64), (0, 2), (0, 3)),
}


def test_bucket_sizes_by_hand():
    # minimal: 128^2 = 16384 px; width 64 -> 256, 128 -> 128, 192 -> 64 (85 rounded down), 256 -> 64
    assert B.bucket_sizes(128, 64, 256) == [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]


def test_bucket_sizes_sdxl_are_near_equal_area_multiples_of_64():
    sizes = B.bucket_sizes(1024, 256, 2048)
    assert (1024, 1024) in sizes and (832, 1216) in sizes and (1216, 832) in sizes  # SDXL's well-known 832x1216
    for h, w in sizes:
        assert h % 64 == 0 and w % 64 == 0 and 256 <= min(h, w) and max(h, w) <= 2048
        assert 1024 * 1024 - 64 * max(h, w) < h * w <= 1024 * 1024  # the largest area one 64 px row allows
        assert (w, h) in sizes


def test_batches_never_mix_buckets_and_cover_every_sample_once():
    sizes = [(64, 192)] * 5 + [(128, 128)] * 7 + [(256, 64)] * 1
    batches = B.batches_by_bucket(sizes, 3, torch.Generator().manual_seed(0))
    assert len(batches) == B.count_batches(sizes, 3) == 2 + 3 + 1
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    assert all(len({sizes[i] for i in b}) == 1 and len(b) <= 3 for b in batches)
    again = B.batches_by_bucket(sizes, 3, torch.Generator().manual_seed(0))
    other = B.batches_by_bucket(sizes, 3, torch.Generator().manual_seed(1))
    assert again == batches and other != batches


def _mixed(tmp_path, make_image, small, **options):
    for i, (name, (w, h)) in enumerate(IMAGES.items()):
        make_image(tmp_path / "3_art" / name, w, h, seed=i, caption=f"art, {name[:-4]}")
    return build_dataset([Subset(tmp_path)], dataclasses.replace(small, **options))


def test_mixed_ratios_are_placed_as_worked_by_hand(tmp_path, make_image, small):
    dataset = _mixed(tmp_path, make_image, small)
    got = {it.path.name: (it.original_size, it.bucket, it.crop, it.conditioning(True)[1]) for it in dataset.items}
    assert got == EXPECTED


def test_batches_have_one_shape_and_the_right_size_and_crop_conditioning(tmp_path, make_image, small, tiny):
    sd, tokenizers = tiny
    dataset = _mixed(tmp_path, make_image, small, flip=True)
    cache = prepare_cache(sd, tokenizers, dataset, "cpu", tmp_path / "cache")
    pooled_dim = sd.cfg.text_encoders[1].proj_dim
    seen = Counter()
    for epoch in (1, 2):
        plan = dataset.epoch(epoch, 2, seed=7)
        batches = list(cache.batches(epoch, 2, seed=7))
        assert len(batches) == len(plan) == cache.steps_per_epoch(2) == 2 + 2 + 1 + 2  # 128x128: 6 samples, others 3 each
        for samples, (latents, context, y, _, _) in zip(plan, batches):
            names = [dataset.items[s.index].path.name for s in samples]
            (bh, bw), = {EXPECTED[n][1] for n in names}  # one bucket per batch
            assert latents.shape == (len(samples), 4, bh // 8, bw // 8)
            original = [EXPECTED[n][0] for n in names]
            crop = [EXPECTED[n][3] if s.flipped else EXPECTED[n][2] for n, s in zip(names, samples)]
            expected = sd.adm(torch.zeros(len(samples), pooled_dim), original, crop, [(bh, bw)] * len(samples))
            torch.testing.assert_close(y[:, pooled_dim:], expected[:, pooled_dim:], rtol=0, atol=0)
            for s, row in zip(samples, latents):
                torch.testing.assert_close(row, (cache.flipped if s.flipped else cache.latents)[s.index], rtol=0, atol=0)
            seen.update((n, s.flipped) for n, s in zip(names, samples))
    assert seen[("wide.png", True)] and seen[("wide.png", False)]  # both sides of the flip were trained
    wide = next(i for i, it in enumerate(dataset.items) if it.path.name == "wide.png")
    mirrored = encode_latents(sd, load_pixels(dataset.items[wide]).flip(-1)[None])[0]
    torch.testing.assert_close(cache.flipped[wide], mirrored, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cache.flipped[wide], cache.latents[wide], atol=1e-3)
