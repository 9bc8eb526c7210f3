"""Regularization images: kohya's balanced repeats, the mix in each epoch, their captions, prior_loss_weight, the plan."""
from collections import Counter

import pytest
import torch

from gesso.engine import diffusion
from gesso.engine.config.load import load_config
from gesso.engine.config.sections import LossSection
from gesso.engine.data.cache import prepare_cache
from gesso.engine.data.dataset import balance_reg
from gesso.engine.loop import objective
from gesso.engine.loop.inputs import load_dataset
from gesso.engine.loop.plan import Plan

AC = diffusion.scaled_linear_alphas_cumprod()


@pytest.mark.parametrize("train, reg, expected", [
    (30, [1] * 5, [6] * 5),  # few reg images: each gains a repeat per round until 30
    (10, [1] * 25, [1] * 10 + [0] * 15),  # more than needed: the first 10 only (kohya: "some of reg images are not used")
    (7, [3, 3], [4, 3]),  # first round 6, then one more for the first image
    (4, [3, 3], [3, 3]),  # the first round is taken whole, as kohya's loop does: 6 >= 4
    (0, [2, 2], [0, 0]),  # nothing to balance against
])
def test_balance_follows_kohyas_rule(train, reg, expected):
    assert balance_reg(train, reg) == expected


@pytest.fixture
def reg_config(tmp_path, make_image):
    """2 training images x 5 repeats (one bucket) and 3 regularization images of class `person` without captions."""
    for i in range(2):
        make_image(tmp_path / "train" / "5_zkchar" / f"t{i}.png", 64, 64, seed=i, caption="zkchar, red hair")
    for i in range(3):
        make_image(tmp_path / "reg" / "1_person" / f"r{i}.png", 64, 64, seed=10 + i)
    (tmp_path / "c.toml").write_text('[dataset]\npath = "train"\ntrigger = "zkchar"\nresolution = 64\n'
                                     'min_bucket_side = 64\nmax_bucket_side = 128\n'
                                     '[[dataset.subsets]]\npath = "reg"\nis_reg = true\n'
                                     '[train]\nbatch_size = 2\nprior_loss_weight = 0.25\n')
    return load_config(tmp_path / "c.toml")


def test_epochs_hold_the_balanced_mix_with_reg_captions(reg_config):
    dataset = load_dataset(reg_config)
    reg = {it.path.name: it for it in dataset.items if it.is_reg}
    assert {n: it.repeats for n, it in reg.items()} == {"r0.png": 4, "r1.png": 3, "r2.png": 3}  # balance_reg(10, [1, 1, 1])
    assert {it.caption for it in reg.values()} == {"person"}  # the class prompt, without the dataset's trigger
    assert dataset.samples(False) == dataset.samples(True) == 10
    for epoch in (1, 2):
        batches = dataset.epoch(epoch, 2, seed=3)
        seen = Counter(dataset.items[s.index].path.name for b in batches for s in b)
        assert seen == {"t0.png": 5, "t1.png": 5, "r0.png": 4, "r1.png": 3, "r2.png": 3}
        kinds = [tuple(sorted(dataset.items[s.index].is_reg for s in b)) for b in batches]
        assert (False, True) in kinds  # shuffled together: some steps pair a training and a regularization image
    plan = Plan(dataset, 2, 3)
    assert plan.steps_per_epoch == 10 and plan.total_steps == 30  # 20 samples in one bucket, batch 2
    assert plan.describe() == ("2 images x 5 repeats = 10 samples + 10 regularization samples = 20 / batch 2 = "
                               "10 steps per epoch x 3 epochs = 30 steps")
    assert "regularization: 3 images, 10 samples per epoch" in dataset.report()
    assert dataset.folders() == {"5_zkchar": {"n_repeats": 5, "img_count": 2}}  # ss_dataset_dirs: training images only


def test_prior_loss_weight_scales_the_reg_samples_loss(reg_config, tiny):
    sd, tokenizers = tiny
    dataset = load_dataset(reg_config)
    cache = prepare_cache(sd, tokenizers, dataset, "cpu")
    batch = next(b for b in cache.batches(1, 20, seed=3))  # the whole epoch in one batch: both kinds
    x0, context, y, weight, mask = batch
    assert mask is None
    is_reg = torch.tensor([it.is_reg for it in dataset.items])
    g = torch.Generator().manual_seed(0)
    d = objective.draw(x0, LossSection(), AC, g)
    pred = torch.randn(x0.shape, generator=g)
    per_sample = ((pred - d.target) ** 2).mean(dim=(1, 2, 3))
    sample_reg = torch.tensor([dataset.items[s.index].is_reg for s in dataset.epoch(1, 20, seed=3)[0]])
    assert sample_reg.sum() == 10 and is_reg.any()
    torch.testing.assert_close(weight, torch.where(sample_reg, 0.25, 1.0))
    expected = (per_sample * torch.where(sample_reg, 0.25, 1.0)).mean()
    torch.testing.assert_close(objective.loss(pred, d, LossSection(), AC, weight), expected)
    assert not torch.allclose(objective.loss(pred, d, LossSection(), AC), expected)  # the weight matters
