"""LoRA dropout (network.dropout, rank_dropout, module_dropout): the neuron dropout a LoRA linear runs is the fused
kernel's, matching its PyTorch reference under the interpreter with the same mask seed; rank and module dropout are
kohya's formulas on a fixed mask; at inference (OFF) nothing changes."""
import math

import pytest
import torch
import torch.nn.functional as F

from gesso.engine.lora.network import OFF, Dropout, LoRAConv2d, LoRALinear, LoRANetwork
from gesso.kernels.dispatch import forced
from gesso.kernels.lora_linear import dropout_keep_mask, lora_linear_ref, reference_keep_mask


def _linear(seed=0, in_features=48, out_features=40, rank=8):
    torch.manual_seed(seed)
    m = LoRALinear(torch.nn.Linear(in_features, out_features).requires_grad_(False), rank, 4.0)
    torch.nn.init.normal_(m.lora_up)  # a trained module: up is no longer zero
    return m


def test_neuron_dropout_runs_the_kernels_mask():
    m = _linear()
    m.dropout, m.dropout_seed = Dropout(neuron=0.3), 1234
    x = torch.randn(2, 77, 48)
    with forced("triton"):  # the fused kernel (Triton's interpreter on a CPU)
        y = m(x)
    keep = dropout_keep_mask(1234, x.shape, 0.3, x.device)
    want = lora_linear_ref(x, m.base.weight, m.base.bias, m.lora_down, m.lora_up, m.scale, upcast=True,
                           dropout_p=0.3, dropout_mask=keep)
    torch.testing.assert_close(y.double(), want.double(), rtol=1e-4, atol=1e-4)
    without = lora_linear_ref(x, m.base.weight, m.base.bias, m.lora_down, m.lora_up, m.scale, upcast=True)
    assert (y - without).abs().max() > 1e-2  # the mask did something


def test_neuron_dropout_on_the_reference_path_is_seeded():
    m = _linear()
    m.dropout, m.dropout_seed = Dropout(neuron=0.25), 77
    x = torch.randn(3, 48)
    with forced("reference"):
        y, again = m(x), m(x)
        m.dropout_seed = 78
        other = m(x)
    keep = reference_keep_mask(77, x.shape, 0.25, x.device)
    want = m.base(x) + m.scale / 0.75 * F.linear(F.linear(x * keep, m.lora_down), m.lora_up)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, again) and not torch.equal(y, other)  # a recomputation sees the same mask, a new seed another


@pytest.mark.parametrize("batch_shape", [(4,), (4, 77)])  # UNet tokens and text-encoder sequences share one mask per sample
def test_rank_dropout_is_kohyas_formula_on_a_fixed_mask(batch_shape):
    m = _linear()
    m.dropout, m.dropout_seed = Dropout(rank=0.5), 5
    x = torch.randn(*batch_shape, 48)
    mask = torch.rand((4, 8), generator=torch.Generator().manual_seed(5 + 2)) > 0.5  # kohya: rand((B, r)) > p
    assert 0 < mask.sum() < mask.numel()
    lx = F.linear(x, m.lora_down) * mask.reshape(4, *[1] * (len(batch_shape) - 1), 8)
    want = m.base(x) + lx @ m.lora_up.t() * m.scale * (1 / (1 - 0.5))  # kohya: scale * 1 / (1 - rank_dropout)
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


def test_rank_and_neuron_dropout_on_a_conv():
    torch.manual_seed(1)
    m = LoRAConv2d(torch.nn.Conv2d(6, 10, 3, padding=1).requires_grad_(False), 4, 2.0)
    torch.nn.init.normal_(m.lora_up)
    m.dropout, m.dropout_seed = Dropout(neuron=0.2, rank=0.5), 11
    x = torch.randn(3, 6, 9, 9)
    keep = reference_keep_mask(11, x.shape, 0.2, x.device)
    mask = torch.rand((3, 4), generator=torch.Generator().manual_seed(13)) > 0.5
    h = F.conv2d(x * keep / 0.8, m.lora_down, padding=1) * mask[:, :, None, None]
    want = m.base(x) + m.scale / 0.5 * F.conv2d(h, m.lora_up)
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


def test_module_dropout_skips_the_whole_module_with_its_probability():
    m = _linear()
    x = torch.randn(2, 48)
    m.dropout = Dropout(module=0.3)
    skipped = 0
    for seed in range(400):
        m.dropout_seed = seed
        y = m(x)
        if torch.equal(y, m.base(x)):
            skipped += 1
            # kohya's rule: torch.rand(1) < module_dropout skips; the same coin from this seed
            assert torch.rand(1, generator=torch.Generator().manual_seed(seed + 1)).item() < 0.3
    # 400 Bernoulli(0.3) coins: std 9.2, so 120 +- 40 is over 4 sigma
    assert abs(skipped - 120) < 40


def test_nothing_changes_at_inference():
    m = _linear()
    x = torch.randn(4, 48)
    plain = m(x)
    network = LoRANetwork({"lora_unet_a": m}, {})
    network.set_dropout(Dropout(0.4, 0.4, 0.4))
    network.reseed(3)
    assert not torch.equal(m(x), plain)
    network.set_dropout(OFF)
    assert torch.equal(m(x), plain)


def test_reseed_gives_every_module_its_own_seeds():
    network = LoRANetwork({f"lora_unet_{i}": _linear(i) for i in range(3)}, {})
    network.reseed(12)
    seeds = [m.dropout_seed for m in network.modules.values()]
    assert len({s + k for s in seeds for k in range(3)}) == 9 and all(0 <= s < 2**31 for s in seeds)
    network.reseed(13)
    assert seeds != [m.dropout_seed for m in network.modules.values()]
    assert math.isclose(Dropout.of(type("N", (), {"dropout": 0.1, "rank_dropout": 0.2, "module_dropout": 0.3})).rank, 0.2)
