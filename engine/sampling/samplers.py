"""Samplers for epsilon- and v-prediction models on the discrete DDPM schedule, in k-diffusion's form.

Samplers work on x = x_t / sqrt(ᾱ_t) = x0 + σ ε with σ = sqrt((1 - ᾱ) / ᾱ) (Karras et al. 2022, sec. 2), take a
denoiser D(x, σ, t) -> x0 and a Schedule (σ_0 > ... > σ_n, and the training timestep t_i the model sees at σ_i),
and return x at σ_n. The latent at that noise level is x / sqrt(σ_n² + 1) (identical when σ_n = 0).

The schedules are the ones diffusers' schedulers build, so each sampler matches its scheduler to float error
(tests/engine/sampling/test_samplers.py): Euler and Euler a on timesteps linspace(999, 0, n) with σ interpolated
linearly in t; DPM++ 2M on Karras σs with rounded timesteps; DDIM on "leading" timesteps (1000 // n) i + 1.
On a zero-terminal-SNR schedule σ_T is infinite; as diffusers' Euler and DPM-Solver do, ᾱ_T becomes 2^-24, so
σ_max ≈ 4096 and sampling starts from (almost) pure noise at t = T.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch

Denoiser = Callable[[torch.Tensor, float, float], torch.Tensor]  # (x, sigma, timestep) -> x0 estimate
Noise = Callable[[], torch.Tensor]  # a fresh N(0, I) draw shaped like x


@dataclass(frozen=True)
class Schedule:
    sigmas: torch.Tensor  # (n + 1,) float64, decreasing, last one 0 or the smallest training σ
    timesteps: torch.Tensor  # (n,) float64, the training timestep of each σ but the last

    def tail(self, steps: int) -> "Schedule":
        """The last `steps` steps: where img2img starts for a denoising strength of steps / n."""
        n = len(self.timesteps)
        return Schedule(self.sigmas[n - steps :], self.timesteps[n - steps :])


TERMINAL_ALPHA_CUMPROD = 2.0**-24  # fp16's smallest subnormal: diffusers' stand-in for ᾱ_T = 0


def training_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), the VE noise level of each training timestep (Karras et al. 2022, eq. 4);
    a zero ᾱ_T (zero terminal SNR) is taken as 2^-24, so that σ_max is finite."""
    alphas_cumprod = alphas_cumprod.clone()
    if alphas_cumprod[-1] == 0:
        alphas_cumprod[-1] = TERMINAL_ALPHA_CUMPROD
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def t_to_sigma(t: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """σ at fractional timesteps, linear in σ between training steps (diffusers' "linear" interpolation)."""
    low = t.floor().long().clamp(0, len(train_sigmas) - 2)
    w = t - low
    return (1 - w) * train_sigmas[low] + w * train_sigmas[low + 1]


def sigma_to_t(sigma: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of σ, linear in log σ between training steps (k-diffusion DiscreteSchedule.sigma_to_t)."""
    log_sigmas = train_sigmas.log()
    log_sigma = sigma.clamp(min=1e-10).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def linspace_schedule(train_sigmas: torch.Tensor, steps: int) -> Schedule:
    """Timesteps evenly spaced from T-1 to 0 (Lin et al. 2024, table 2 "linspace"), then σ = 0."""
    t = torch.linspace(len(train_sigmas) - 1, 0, steps, dtype=torch.float64)
    return Schedule(torch.cat([t_to_sigma(t, train_sigmas), t.new_zeros(1)]), t)


def karras_schedule(train_sigmas: torch.Tensor, steps: int, rho: float = 7.0) -> Schedule:
    """σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ (Karras et al. 2022, eq. 5), then σ = 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = train_sigmas[0].item() ** (1 / rho), train_sigmas[-1].item() ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return Schedule(torch.cat([sigmas, sigmas.new_zeros(1)]), sigma_to_t(sigmas, train_sigmas).round())


def leading_schedule(train_sigmas: torch.Tensor, steps: int) -> Schedule:
    """Timesteps (T // n) i + 1 (the SD/LDM DDIM discretisation, Song et al. 2021), ending at σ of t = 0."""
    t = (torch.arange(steps - 1, -1, -1) * (len(train_sigmas) // steps) + 1).to(torch.float64)
    return Schedule(torch.cat([train_sigmas[t.long()], train_sigmas[:1]]), t)


def ancestral_step(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(σ_down, σ_up) with σ_down² + σ_up² = σ_next² for an ancestral step, η = 1 (k-diffusion get_ancestral_step)."""
    up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return (sigma_next**2 - up**2) ** 0.5, up


@torch.no_grad()
def sample_euler(denoise: Denoiser, x: torch.Tensor, schedule: Schedule, noise: Noise | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x - D(x; σ)) / σ (Karras et al. 2022, alg. 1 without churn)."""
    sigmas, ts = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    for i, t in enumerate(ts):
        d = (x - denoise(x, sigmas[i], t)) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(denoise: Denoiser, x: torch.Tensor, schedule: Schedule, noise: Noise) -> torch.Tensor:
    """Euler down to σ_down, then fresh noise up to σ_next (Ho et al. 2020 ancestral sampling; k-diffusion sample_euler_ancestral)."""
    sigmas, ts = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    for i, t in enumerate(ts):
        down, up = ancestral_step(sigmas[i], sigmas[i + 1])
        d = (x - denoise(x, sigmas[i], t)) / sigmas[i]
        x = x + d * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise() * up
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, schedule: Schedule, noise: Noise | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) in λ = -log σ, first order on the first and last steps (Lu et al. 2022, alg. 2)."""
    sigmas, ts = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    old_denoised, h_last = None, None
    for i, t in enumerate(ts):
        denoised = denoise(x, sigmas[i], t)
        if sigmas[i + 1] == 0:
            x = denoised  # the first-order update's limit as σ_next -> 0
            continue
        h = torch.log(torch.tensor(sigmas[i] / sigmas[i + 1], dtype=torch.float64)).item()
        if old_denoised is None:
            target = denoised
        else:
            r = h_last / h
            target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(torch.tensor(-h, dtype=torch.float64)).item() * target
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_ddim(denoise: Denoiser, x: torch.Tensor, schedule: Schedule, noise: Noise | None = None) -> torch.Tensor:
    """DDIM, η = 0 (Song et al. 2021, eq. 12), which is Euler's step in x_t / sqrt(ᾱ_t) (Karras et al. 2022, sec. 3)."""
    return sample_euler(denoise, x, schedule)


@dataclass(frozen=True)
class Sampler:
    run: Callable[..., torch.Tensor]
    schedule: Callable[[torch.Tensor, int], Schedule]
    a1111_name: str  # the infotext's "Sampler" and "Schedule type" as AUTOMATIC1111 writes them
    a1111_schedule: str


SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler(sample_euler, linspace_schedule, "Euler", "Automatic"),
    "euler_a": Sampler(sample_euler_ancestral, linspace_schedule, "Euler a", "Automatic"),
    "dpmpp_2m_karras": Sampler(sample_dpmpp_2m, karras_schedule, "DPM++ 2M", "Karras"),
    "ddim": Sampler(sample_ddim, leading_schedule, "DDIM", "Automatic"),
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def epsilon_denoiser(eps: Callable[[torch.Tensor, float], torch.Tensor]) -> Denoiser:
    """D(x; σ) = x - σ ε(x / sqrt(σ² + 1), t): an ε-prediction model seen from x0 + σ ε (Karras et al. 2022, table 1, VP)."""

    def denoise(x: torch.Tensor, sigma: float, t: float) -> torch.Tensor:
        return x - sigma * eps(x / (sigma**2 + 1) ** 0.5, t).to(x.dtype)

    return denoise


def v_denoiser(v: Callable[[torch.Tensor, float], torch.Tensor]) -> Denoiser:
    """D(x; σ) = x / (σ² + 1) - σ / sqrt(σ² + 1) · v(x / sqrt(σ² + 1), t): a v-prediction model seen from x0 + σ ε, since
    x0 = sqrt(ᾱ) x_t - sqrt(1 - ᾱ) v (Salimans & Ho 2022, sec. 4; Karras et al. 2022, table 1 preconditioning)."""

    def denoise(x: torch.Tensor, sigma: float, t: float) -> torch.Tensor:
        scale = (sigma**2 + 1) ** 0.5
        return x / scale**2 - (sigma / scale) * v(x / scale, t).to(x.dtype)

    return denoise


DENOISERS = {"epsilon": epsilon_denoiser, "v_prediction": v_denoiser}


def denoiser(prediction: str, model: Callable[[torch.Tensor, float], torch.Tensor]) -> Denoiser:
    """The denoiser of a model predicting `prediction` ("epsilon" or "v_prediction") from (x_t, t)."""
    if prediction not in DENOISERS:
        raise ValueError(f"unknown prediction {prediction!r}; known: {', '.join(DENOISERS)}")
    return DENOISERS[prediction](model)


def guided(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̂ = ε_u + s (ε_c - ε_u), classifier-free guidance (Ho & Salimans 2022, eq. 6); v is affine in ε at fixed x_t,
    so the same mix guides a v-prediction model."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def initial_latent(noise: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Pure noise at σ_0: x = ε sqrt(σ_0² + 1), the VE view of x_T ~ N(0, I) (as SGM and ComfyUI start)."""
    return noise * (schedule.sigmas[0].item() ** 2 + 1) ** 0.5


def noised_latent(latent: torch.Tensor, noise: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """img2img start: x = x0 + σ_0 ε (Meng et al. 2022, SDEdit, in VE form)."""
    return latent + noise * schedule.sigmas[0].item()


def final_latent(x: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """x_t = x sqrt(ᾱ_t) at the last σ: back from x0 + σ ε to the model's latent scale."""
    return x / (schedule.sigmas[-1].item() ** 2 + 1) ** 0.5


def image_noise(generators: list[torch.Generator], shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    """One N(0, I) draw per image from its own CPU generator, stacked: the same images at any batch size or device."""
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(device, dtype)
