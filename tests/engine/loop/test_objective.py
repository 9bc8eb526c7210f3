"""Each loss and noise option changes what it claims to change."""
import math

import pytest
import torch

from gesso.engine import diffusion
from gesso.engine.config.sections import LossSection
from gesso.engine.loop import objective

AC = diffusion.scaled_linear_alphas_cumprod()


def test_schedule_endpoints_match_the_ldm_values():
    # ᾱ_0 = 0.99915, ᾱ_999 = 0.0046601 for scaled_linear 0.00085..0.012 (REFERENCE.md, diffusers' DDPMScheduler)
    assert AC[0].item() == pytest.approx(0.99915, abs=1e-6)
    assert AC[-1].item() == pytest.approx(0.0046601, rel=1e-4)


def test_v_prediction_target_is_exact():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    opts = LossSection(prediction="v_prediction")
    d = objective.draw(x0.float(), opts, AC, g)
    ab = AC[d.t].view(-1, 1, 1, 1)
    # v-parametrisation recovers x0 and ε from (x_t, v): x0 = √ᾱ x_t − √(1−ᾱ) v, ε = √(1−ᾱ) x_t + √ᾱ v
    x0_back = ab.sqrt() * d.noisy.double() - (1 - ab).sqrt() * d.target.double()
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-5)
    eps = (1 - ab).sqrt() * d.noisy.double() + ab.sqrt() * d.target.double()
    torch.testing.assert_close(diffusion.add_noise(x0, eps, d.t, AC), d.noisy.double(), rtol=0, atol=1e-5)


def test_min_snr_weights_equal_their_formula():
    t = torch.tensor([0, 10, 250, 500, 999])
    ab = AC[t]
    snr = ab / (1 - ab)
    for gamma in (1.0, 5.0):
        expected_eps = torch.minimum(snr, torch.tensor(gamma)) / snr
        expected_v = torch.minimum(snr, torch.tensor(gamma)) / (snr + 1)
        torch.testing.assert_close(diffusion.min_snr_weight(t, AC, gamma, "epsilon"), expected_eps.float())
        torch.testing.assert_close(diffusion.min_snr_weight(t, AC, gamma, "v_prediction"), expected_v.float())
    # high-noise steps (SNR < γ) keep weight 1 for ε; low-noise steps are down-weighted
    w = diffusion.min_snr_weight(t, AC, 5.0, "epsilon")
    assert w[-1] == 1.0 and w[0] < 0.01


def test_min_snr_weighting_is_applied_per_sample():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    opts = LossSection(min_snr_gamma=5.0)
    d = objective.draw(x0, opts, AC, torch.Generator().manual_seed(2))
    pred = torch.randn(x0.shape, generator=g)
    per = ((pred - d.target) ** 2).mean(dim=(1, 2, 3))
    expected = (per * diffusion.min_snr_weight(d.t, AC, 5.0, "epsilon")).mean()
    torch.testing.assert_close(objective.loss(pred, d, opts, AC), expected)
    assert not torch.allclose(objective.loss(pred, d, LossSection(), AC), expected)


def test_timestep_range_is_respected():
    opts = LossSection(min_timestep=200, max_timestep=300)
    d = objective.draw(torch.zeros(512, 4, 2, 2), opts, AC, torch.Generator().manual_seed(3))
    assert d.t.min() >= 200 and d.t.max() < 300 and d.t.unique().numel() > 50


def test_noise_offset_shifts_each_channel_by_a_constant():
    shape = (256, 4, 16, 16)
    plain = diffusion.offset_noise(shape, torch.Generator().manual_seed(4), 0.0)
    offset = diffusion.offset_noise(shape, torch.Generator().manual_seed(4), 0.1)
    delta = offset - plain
    assert torch.allclose(delta, delta[:, :, :1, :1].expand_as(delta), rtol=0, atol=1e-6)  # constant over each channel
    assert delta[:, :, 0, 0].std().item() == pytest.approx(0.1, rel=0.15)


def test_pyramid_noise_is_unit_variance_with_more_low_frequency_energy():
    g = torch.Generator().manual_seed(5)
    white = torch.randn(64, 4, 32, 32, generator=g)
    pyramid = diffusion.pyramid_noise(white, g, iterations=6, discount=0.8)
    assert pyramid.std(dim=(1, 2, 3)).sub(1).abs().max() < 1e-5

    def low_freq_share(x):
        spectrum = torch.fft.rfft2(x).abs() ** 2
        return (spectrum[..., :4, :4].sum() / spectrum.sum()).item()

    assert low_freq_share(pyramid) > 3 * low_freq_share(white)


def test_huber_is_quadratic_for_small_errors_and_linear_for_large():
    c = 0.1
    small, large = torch.full((1, 4), 1e-3), torch.full((1, 4), 10.0)
    zero = torch.zeros(1, 4)
    assert diffusion.per_sample_loss(small, zero, "huber", c).item() == pytest.approx(1e-6, rel=1e-3)  # ≈ d²
    assert diffusion.per_sample_loss(large, zero, "huber", c).item() == pytest.approx(2 * c * (math.sqrt(100 + c * c) - c), rel=1e-6)
    assert diffusion.per_sample_loss(large, zero, "huber", c).item() < 0.05 * diffusion.per_sample_loss(large, zero).item()
