"""Timestep distributions: 100,000 draws of each pass a Kolmogorov-Smirnov test against its analytic CDF on the
configured range, the integer timesteps are those draws floored and stay in [min, max), and uniform is the draw
every earlier run made."""

import pytest
import torch
from scipy import stats

from gesso.engine.config.sections import LossSection
from gesso.engine.loop import timesteps

N = 100_000
CASES = [
    # (options, CDF of the fraction u in [0, 1))
    (dict(timestep_sampling="logit_normal"), lambda u: stats.norm.cdf(stats.logistic.ppf(u))),  # SD3's default
    (dict(timestep_sampling="logit_normal", logit_mean=-0.7, logit_std=1.6),
     lambda u: stats.norm.cdf(stats.logistic.ppf(u), loc=-0.7, scale=1.6)),
    (dict(timestep_sampling="sigmoid", sigmoid_scale=2.5), lambda u: stats.norm.cdf(stats.logistic.ppf(u), scale=2.5)),
    (dict(timestep_sampling="beta", beta_alpha=3.0, beta_beta=3.0), lambda u: stats.beta.cdf(u, 3.0, 3.0)),
    (dict(timestep_sampling="beta", beta_alpha=0.6, beta_beta=2.2), lambda u: stats.beta.cdf(u, 0.6, 2.2)),  # shape < 1
]
RANGES = [(0, 1000), (200, 801)]  # the whole schedule; a clipped, odd-sized range


@pytest.mark.parametrize("low, high", RANGES)
@pytest.mark.parametrize("options, cdf", CASES, ids=[f"{c[0]['timestep_sampling']}-{i}" for i, c in enumerate(CASES)])
def test_draws_follow_the_analytic_cdf_on_the_range(options, cdf, low, high):
    opts = LossSection(min_timestep=low, max_timestep=high, **options)
    t = timesteps.continuous(N, opts, torch.Generator().manual_seed(3)).numpy()
    assert t.min() >= low and t.max() < high
    result = stats.kstest(t, lambda x: cdf((x - low) / (high - low)))
    assert result.pvalue > 1e-3, result  # a false alarm one run in a thousand; a wrong distribution fails by far
    # the same draws against another distribution fail: the test can tell them apart
    assert stats.kstest(t, lambda x: (x - low) / (high - low)).pvalue < 1e-6


@pytest.mark.parametrize("options, _", CASES[:1] + CASES[3:4])
def test_integer_timesteps_are_the_draws_floored_within_the_range(options, _):
    opts = LossSection(min_timestep=200, max_timestep=801, **options)
    t = timesteps.sample(N, opts, torch.Generator().manual_seed(5))
    expected = timesteps.continuous(N, opts, torch.Generator().manual_seed(5)).floor().long()
    assert t.dtype == torch.long and torch.equal(t, expected)
    assert t.min() >= 200 and t.max() <= 800


def test_uniform_is_the_draw_earlier_runs_made():
    opts = LossSection(min_timestep=10, max_timestep=990)
    got = timesteps.sample(64, opts, torch.Generator().manual_seed(9))
    assert torch.equal(got, torch.randint(10, 990, (64,), generator=torch.Generator().manual_seed(9)))


def test_gamma_matches_its_distribution():
    for shape in (0.4, 1.0, 7.5):
        draws = timesteps.gamma(shape, N, torch.Generator().manual_seed(1)).numpy()
        assert stats.kstest(draws, stats.gamma(shape).cdf).pvalue > 1e-3


def test_unknown_distribution_has_no_continuous_draw():
    with pytest.raises(ValueError, match="uniform"):
        timesteps.continuous(4, LossSection(), torch.Generator())
