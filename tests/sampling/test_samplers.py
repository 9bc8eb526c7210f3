"""Each sampler against the diffusers scheduler it mirrors, from the same initial noise, on a fixed stand-in model.

The stand-in epsilon model depends on the timestep it is given, so these also check that each sampler shows the
model diffusers' timesteps (fractional for linspace, rounded for Karras, integer "leading" for DDIM).
"""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from gesso.engine import diffusion
from gesso.engine.sampling import samplers as sampling

SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULERS = {
    "euler": lambda: EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="linspace"),
    "euler_a": lambda: EulerAncestralDiscreteScheduler(**SCHEDULE, timestep_spacing="linspace"),
    "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler(**SCHEDULE, use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2),
    "ddim": lambda: DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"),
}
SHAPE = (1, 4, 9, 7)  # odd latent size


def stand_in_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed, smooth, timestep-dependent epsilon model: mixes channels and neighbours, bounded."""
    t = float(t)
    mixed = x.roll(1, dims=1) * 0.3 + x.roll(1, dims=-1) * 0.2
    return torch.tanh(x * (0.5 + t / 1000)) * 0.9 + mixed * torch.sin(torch.tensor(t / 137.0)) + 0.01 * t / 1000


def train_sigmas() -> torch.Tensor:
    return sampling.training_sigmas(diffusion.scaled_linear_alphas_cumprod())


def run_diffusers(name: str, steps: int, latents: torch.Tensor, seed: int, start: int = 0) -> torch.Tensor:
    sched = SCHEDULERS[name]()
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    for t in sched.timesteps[start:]:
        eps = stand_in_eps(sched.scale_model_input(latents, t), t)
        latents = sched.step(eps, t, latents, generator=g).prev_sample
    return latents


def run_engine(name: str, schedule: sampling.Schedule, x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = lambda: torch.randn(x.shape, generator=g)  # noqa: E731  the draws diffusers makes, in its order
    x = sampling.get_sampler(name).run(sampling.epsilon_denoiser(stand_in_eps), x, schedule, noise)
    return sampling.final_latent(x, schedule)


@pytest.mark.parametrize("steps", [7, 20])  # few steps; A1111's default 20
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sampler_matches_diffusers(name, steps):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    sched = SCHEDULERS[name]()
    sched.set_timesteps(steps)
    start = noise * sched.init_noise_sigma  # x_T as the diffusers pipeline makes it
    ours_schedule = sampling.get_sampler(name).schedule(train_sigmas(), steps)
    assert torch.allclose(ours_schedule.timesteps, sched.timesteps.double(), atol=1e-3)
    # diffusers' DPM-Solver and DDIM keep x_T in VP scale; the engine works on x_T / sqrt(ᾱ) = x_T sqrt(σ² + 1)
    vp = name in ("dpmpp_2m_karras", "ddim")
    ours_start = start * (ours_schedule.sigmas[0].item() ** 2 + 1) ** 0.5 if vp else start.clone()
    expected = run_diffusers(name, steps, start, seed=123)
    got = run_engine(name, ours_schedule, ours_start, seed=123)
    assert expected.abs().max() > 0.1  # a non-trivial result
    assert (got - expected).abs().max().item() <= 1e-4


def test_initial_latent_is_diffusers_vp_start():
    # txt2img starts at ε sqrt(σ_max² + 1): diffusers' DPM-Solver start (ε in VP scale) seen in VE coordinates
    noise = torch.randn(SHAPE)
    schedule = sampling.karras_schedule(train_sigmas(), 10)
    sched = SCHEDULERS["dpmpp_2m_karras"]()
    sched.set_timesteps(10)
    vp_start = noise * sched.init_noise_sigma
    assert torch.allclose(sampling.initial_latent(noise, schedule) / (sched.sigmas[0] ** 2 + 1) ** 0.5, vp_start, atol=1e-6)


@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_img2img_matches_diffusers(strength):
    # diffusers' img2img: int(n * strength) steps from the tail of the schedule, x0 noised with add_noise
    steps, x0 = 10, torch.randn(SHAPE)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    k = int(steps * strength)
    sched = SCHEDULERS["euler"]()
    sched.set_timesteps(steps)
    start_t = sched.timesteps[steps - k : steps - k + 1]
    expected = run_diffusers("euler", steps, sched.add_noise(x0, noise, start_t), seed=0, start=steps - k)
    schedule = sampling.linspace_schedule(train_sigmas(), steps).tail(k)
    got = run_engine("euler", schedule, sampling.noised_latent(x0, noise, schedule), seed=0)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got - x0).abs().max() > 1e-2  # it did denoise something


def test_ancestral_noise_changes_result_and_seed_reproduces():
    schedule = sampling.linspace_schedule(train_sigmas(), 8)
    start = sampling.initial_latent(torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), schedule)
    a, b, c = (run_engine("euler_a", schedule, start.clone(), seed) for seed in (1, 1, 2))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


def test_guidance_formula():
    # scale 1 is the conditional prediction, scale 0 the unconditional, and it extrapolates linearly beyond
    c, u = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.allclose(sampling.guided(c, u, 1.0), c, atol=1e-6)
    assert torch.equal(sampling.guided(c, u, 0.0), u)
    assert torch.allclose(sampling.guided(c, u, 7.0), u + 7 * (c - u))


def test_image_noise_independent_of_batch():
    # image i's noise comes from seed + i alone, so batch size does not change an image
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    batch = sampling.image_noise(gens, (4, 3, 3), "cpu")
    single = sampling.image_noise([torch.Generator().manual_seed(6)], (4, 3, 3), "cpu")
    assert torch.equal(batch[1], single[0])
    assert not torch.equal(batch[0], batch[1])
