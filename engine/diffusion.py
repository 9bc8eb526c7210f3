"""Diffusion maths for training: the DDPM noise schedule (zero terminal SNR included), forward noising, targets and loss weights."""
import torch
import torch.nn.functional as F


def scaled_linear_betas(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """β_t = linspace(sqrt(b0), sqrt(b1), T)^2 (Rombach et al. 2022, LDM "scaled_linear"), float64."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose sqrt(ᾱ_t) is shifted to 0 at t = T and scaled back to its value at t = 0, so that the last
    timestep is pure noise (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", alg. 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alphas_cumprod = root**2
    return 1.0 - torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])


def scaled_linear_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                                 zero_terminal_snr: bool = False) -> torch.Tensor:
    """ᾱ_t of the scaled-linear betas, rescaled to zero terminal SNR (ᾱ_T = 0) when asked, float64."""
    betas = scaled_linear_betas(steps, beta_start, beta_end)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε (Ho et al. 2020, eq. 4)."""
    ab = alphas_cumprod.to(x0.device)[t].to(torch.float32).view(-1, *([1] * (x0.ndim - 1)))
    return (ab.sqrt() * x0.float() + (1 - ab).sqrt() * noise.float()).to(x0.dtype)


def epsilon_loss(pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error against the added noise, in fp32 (Ho et al. 2020, eq. 14, "simple" loss)."""
    return F.mse_loss(pred.float(), noise.float())


def v_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4)."""
    ab = alphas_cumprod.to(x0.device)[t].to(torch.float32).view(-1, *([1] * (x0.ndim - 1)))
    return ab.sqrt() * noise.float() - (1 - ab).sqrt() * x0.float()


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) (Kingma et al. 2021, "Variational Diffusion Models", eq. 1)."""
    ab = alphas_cumprod.to(t.device)[t].to(torch.float32)
    return ab / (1 - ab)


def min_snr_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-sample loss weight min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v-prediction
    (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 9)."""
    s = snr(t, alphas_cumprod)
    return torch.clamp(s, max=gamma) / (s + 1 if prediction == "v_prediction" else s)


def v_like_noise_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Per-sample weight SNR / (SNR + 1), SNR capped at 1000 as kohya caps it: the v-prediction loss rescaled to the
    ε-prediction loss's weighting over timesteps (kohya's `scale_v_prediction_loss_like_noise_prediction`). In x0
    terms |v - v̂|² weighs the error by SNR + 1 and |ε - ε̂|² by SNR (Salimans & Ho 2022, sec. 4): this is their ratio."""
    s = snr(t, alphas_cumprod).clamp(max=1000.0)
    return s / (s + 1)


def offset_noise(shape: torch.Size, generator: torch.Generator, offset: float) -> torch.Tensor:
    """ε + offset · per-channel constant (Guttenberg 2023, "Diffusion with Offset Noise")."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise: add upsampled coarser noise at discount^i, then renormalise to unit variance
    (Whitaker 2023, "Multi-Resolution Noise for Diffusion Model Training")."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(1, iterations + 1):
        size = (max(1, h // 2**i), max(1, w // 2**i))
        coarse = torch.randn(b, c, *size, generator=generator)
        out += discount**i * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        if min(size) == 1:
            break
    return out / out.std(dim=(1, 2, 3), keepdim=True)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float = 0.1,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over each sample of the squared error, or of the pseudo-Huber loss 2c(sqrt((p-y)^2 + c^2) - c)
    (Charbonnier 1994; as used for diffusion by Khrapov et al. 2024, "Improving Diffusion Models's Data-Corruption
    Resistance using Scheduled Pseudo-Huber Loss"); each element first weighted by `mask` (B, 1, h, w) when given,
    kohya's masked loss (the mean stays over every element, as kohya's)."""
    diff = pred.float() - target.float()
    if kind == "huber":
        err = 2 * huber_c * (torch.sqrt(diff**2 + huber_c**2) - huber_c)
    else:
        err = diff**2
    if mask is not None:
        err = err * mask
    return err.mean(dim=tuple(range(1, err.ndim)))
