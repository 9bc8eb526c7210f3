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
    "euler": lambda **kw: EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="linspace", **kw),
    "euler_a": lambda **kw: EulerAncestralDiscreteScheduler(**SCHEDULE, timestep_spacing="linspace", **kw),
    "dpmpp_2m_karras": lambda **kw: DPMSolverMultistepScheduler(**SCHEDULE, use_karras_sigmas=True, algorithm_type="dpmsolver++",
                                                                solver_order=2, **kw),
    "ddim": lambda **kw: DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", **kw),
}
SHAPE = (1, 4, 9, 7)  # odd latent size


def stand_in_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed, smooth, timestep-dependent epsilon model: mixes channels and neighbours, bounded."""
    t = float(t)
    mixed = x.roll(1, dims=1) * 0.3 + x.roll(1, dims=-1) * 0.2
    return torch.tanh(x * (0.5 + t / 1000)) * 0.9 + mixed * torch.sin(torch.tensor(t / 137.0)) + 0.01 * t / 1000


def train_sigmas(zero_terminal_snr: bool = False) -> torch.Tensor:
    return sampling.training_sigmas(diffusion.scaled_linear_alphas_cumprod(zero_terminal_snr=zero_terminal_snr))


def run_diffusers(name: str, steps: int, latents: torch.Tensor, seed: int, start: int = 0, **kw) -> torch.Tensor:
    sched = SCHEDULERS[name](**kw)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    for t in sched.timesteps[start:]:
        eps = stand_in_eps(sched.scale_model_input(latents, t), t)
        latents = sched.step(eps, t, latents, generator=g).prev_sample
    return latents


def run_engine(name: str, schedule: sampling.Schedule, x: torch.Tensor, seed: int, prediction: str = "epsilon") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = lambda: torch.randn(x.shape, generator=g)  # noqa: E731  the draws diffusers makes, in its order
    x = sampling.get_sampler(name).run(sampling.denoiser(prediction, stand_in_eps), x, schedule, noise)
    return sampling.final_latent(x, schedule)


# the stand-in serves as an ε-model and as a v-model; zero terminal SNR (NoobAI V-Pred) only with v-prediction
PARAMETERISATIONS = [("epsilon", False), ("v_prediction", False), ("v_prediction", True)]


@pytest.mark.parametrize("prediction,ztsnr", PARAMETERISATIONS)
@pytest.mark.parametrize("steps", [7, 20])  # few steps; A1111's default 20
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sampler_matches_diffusers(name, steps, prediction, ztsnr):
    kw = dict(prediction_type=prediction, rescale_betas_zero_snr=ztsnr)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    sched = SCHEDULERS[name](**kw)
    sched.set_timesteps(steps)
    start = noise * sched.init_noise_sigma  # x_T as the diffusers pipeline makes it
    ours_schedule = sampling.get_sampler(name).schedule(train_sigmas(ztsnr), steps)
    assert torch.allclose(ours_schedule.timesteps, sched.timesteps.double(), atol=1e-3)
    # diffusers' DPM-Solver and DDIM keep x_T in VP scale; the engine works on x_T / sqrt(ᾱ) = x_T sqrt(σ² + 1)
    vp = name in ("dpmpp_2m_karras", "ddim")
    ours_start = start * (ours_schedule.sigmas[0].item() ** 2 + 1) ** 0.5 if vp else start.clone()
    expected = run_diffusers(name, steps, start, seed=123, **kw)
    got = run_engine(name, ours_schedule, ours_start, seed=123, prediction=prediction)
    assert expected.abs().max() > 0.1  # a non-trivial result
    assert (got - expected).abs().max().item() <= 1e-4


def test_zero_terminal_snr_starts_from_pure_noise_at_t_max():
    # σ_max is diffusers' finite stand-in (ᾱ_T = 2^-24, σ ≈ 4096), not inf, and the linspace and Karras schedules
    # start at t = 999, so the first step sees (almost) no signal
    sigmas = train_sigmas(zero_terminal_snr=True)
    assert torch.isfinite(sigmas).all() and sigmas[-1].item() == pytest.approx((2**24 - 1) ** 0.5, rel=1e-9)
    for name in ("euler", "dpmpp_2m_karras"):
        schedule = sampling.get_sampler(name).schedule(sigmas, 10)
        assert schedule.timesteps[0].item() == 999 and schedule.sigmas[0].item() == pytest.approx(sigmas[-1].item())


def test_v_denoiser_recovers_x0_from_the_true_v():
    # with the exact v of (x0, ε) at σ, D returns x0 (so x0 = sqrt(ᾱ) x_t - sqrt(1 - ᾱ) v is wired the right way round)
    x0, eps, sigma = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64), 3.7
    a, b = 1 / (sigma**2 + 1) ** 0.5, sigma / (sigma**2 + 1) ** 0.5  # sqrt(ᾱ), sqrt(1 - ᾱ)
    d = sampling.denoiser("v_prediction", lambda x_t, t: a * eps - b * x0)
    assert torch.allclose(d(x0 + sigma * eps, sigma, 500.0), x0, atol=1e-12)


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
