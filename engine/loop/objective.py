"""What one training step asks of the UNet: the noise, timesteps and target it sees, and the weighted loss.

Options follow kohya's sd-scripts: noise offset, multi-resolution noise, a timestep range and distribution, min-SNR-γ
weighting, epsilon or v-prediction targets, L2 or pseudo-Huber loss.
"""
from dataclasses import dataclass

import torch

from gesso.engine import diffusion
from gesso.engine.config.sections import LossSection
from gesso.engine.loop import timesteps


@dataclass
class Draw:
    noisy: torch.Tensor  # x_t, the UNet's input
    t: torch.Tensor  # (B,) long
    target: torch.Tensor  # ε or v


def draw(x0: torch.Tensor, opts: LossSection, alphas_cumprod: torch.Tensor, g: torch.Generator) -> Draw:
    """Noise and timesteps from the CPU generator `g` (the same draws on any device), then x_t and the target."""
    noise = diffusion.offset_noise(x0.shape, g, opts.noise_offset)
    if opts.multires_noise_iterations:
        noise = diffusion.pyramid_noise(noise, g, opts.multires_noise_iterations, opts.multires_noise_discount)
    t = timesteps.sample(x0.shape[0], opts, g)
    noise, t = noise.to(x0.device), t.to(x0.device)
    noisy = diffusion.add_noise(x0, noise, t, alphas_cumprod)
    target = diffusion.v_target(x0, noise, t, alphas_cumprod) if opts.prediction == "v_prediction" else noise
    return Draw(noisy, t, target)


def loss(pred: torch.Tensor, d: Draw, opts: LossSection, alphas_cumprod: torch.Tensor,
         weight: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of the per-sample loss, min-SNR-γ weighted when γ > 0, v-loss scaled like ε when asked. weight: (B,) per-sample weights
    (kohya's loss_weights: prior_loss_weight for regularization images); mask: (B, 1, h, w) per latent pixel."""
    per_sample = diffusion.per_sample_loss(pred, d.target, opts.loss_type, opts.huber_c, mask)
    if weight is not None:
        per_sample = per_sample * weight
    if opts.min_snr_gamma:
        per_sample = per_sample * diffusion.min_snr_weight(d.t, alphas_cumprod, opts.min_snr_gamma, opts.prediction)
    if opts.scale_v_pred_loss_like_noise_pred:
        per_sample = per_sample * diffusion.v_like_noise_weight(d.t, alphas_cumprod)
    return per_sample.mean()
