"""Diffusion maths for training: the DDPM noise schedule, forward noising and the epsilon loss."""
import torch
import torch.nn.functional as F


def scaled_linear_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t for betas = linspace(sqrt(b0), sqrt(b1), T)^2 (Rombach et al. 2022, LDM "scaled_linear"), float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε (Ho et al. 2020, eq. 4)."""
    ab = alphas_cumprod.to(x0.device)[t].to(torch.float32).view(-1, *([1] * (x0.ndim - 1)))
    return (ab.sqrt() * x0.float() + (1 - ab).sqrt() * noise.float()).to(x0.dtype)


def epsilon_loss(pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error against the added noise, in fp32 (Ho et al. 2020, eq. 14, "simple" loss)."""
    return F.mse_loss(pred.float(), noise.float())
