"""Which timesteps a training step sees: uniform over [min_timestep, max_timestep) as kohya draws them, or a density
over that range that weights the middle (logit-normal, Esser et al. 2024 "Scaling Rectified Flow Transformers", eq. 19;
kohya's `sigmoid` sampling, the same family with mean 0; OneTrainer's Beta).

A non-uniform draw is a fraction u in (0, 1) from the distribution, mapped linearly onto the range and floored to an
integer timestep, so the integer t has probability F((t + 1 - min) / (max - min)) - F((t - min) / (max - min)) under the
distribution's CDF F. Every draw comes from the run's CPU generator, so a run is the same on any device.
"""
import math

import torch

from gesso.engine.config.sections import LossSection


def continuous(n: int, opts: LossSection, g: torch.Generator) -> torch.Tensor:
    """(n,) float64 timesteps in [min_timestep, max_timestep) before flooring, for a non-uniform distribution."""
    if opts.timestep_sampling == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=g, dtype=torch.float64) * opts.logit_std + opts.logit_mean)
    elif opts.timestep_sampling == "sigmoid":
        u = torch.sigmoid(torch.randn(n, generator=g, dtype=torch.float64) * opts.sigmoid_scale)
    elif opts.timestep_sampling == "beta":
        a, b = gamma(opts.beta_alpha, n, g), gamma(opts.beta_beta, n, g)
        u = a / (a + b)
    else:
        raise ValueError(f"no continuous draw for timestep_sampling = {opts.timestep_sampling!r}")
    return opts.min_timestep + u * (opts.max_timestep - opts.min_timestep)


def sample(n: int, opts: LossSection, g: torch.Generator) -> torch.Tensor:
    """(n,) long timesteps in [min_timestep, max_timestep) from `opts.timestep_sampling`."""
    if opts.timestep_sampling == "uniform":  # the draw every earlier run made: the same seed keeps the same run
        return torch.randint(opts.min_timestep, opts.max_timestep, (n,), generator=g)
    t = continuous(n, opts, g).floor().long()
    return t.clamp(opts.min_timestep, opts.max_timestep - 1)  # u rounds to 1.0 only at float64's last bit


def gamma(shape: float, n: int, g: torch.Generator) -> torch.Tensor:
    """(n,) float64 Gamma(shape, 1) draws from `g` (Marsaglia & Tsang 2000, "A simple method for generating gamma
    variables", with their U^(1/a) boost for shape < 1); torch's own sampler takes no generator."""
    a = shape + 1 if shape < 1 else shape
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    out = torch.empty(n, dtype=torch.float64)
    todo = torch.arange(n)
    while todo.numel():  # each round accepts over 95% of what is left
        x = torch.randn(todo.numel(), generator=g, dtype=torch.float64)
        u = torch.rand(todo.numel(), generator=g, dtype=torch.float64)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp(min=1e-300)))
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    if shape < 1:
        out *= torch.rand(n, generator=g, dtype=torch.float64) ** (1 / shape)
    return out
