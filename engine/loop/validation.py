"""The validation loss: the run's objective on held-out images (dataset.validation_split or validation_dir) at fixed
timesteps and fixed noise, so that the number compares one epoch with another and one run with another on the same
data, and so that computing it changes nothing in the training (its own generator, no gradients).

As kohya's sd-scripts do it (train_network.py): every image at each of the timesteps 10, 350, 500, 650 and 990 (moved
into [min_timestep, max_timestep)), with noise from a generator seeded by dataset.validation_seed (0: train.seed).
The loop calls `validate` after every epoch (and every train.validate_every_n_steps); a host's control can call it
at any step boundary.
"""
import torch

from gesso.engine import diffusion
from gesso.engine.config.sections import Config, LossSection
from gesso.engine.data.cache import Cache
from gesso.engine.loop import objective

TIMESTEPS = (10, 350, 500, 650, 990)
BATCH = 8  # images per forward: the validation set is small and this runs under no_grad


def validation_seed(cfg: Config) -> int:
    """The seed of the split and of the validation noise: dataset.validation_seed, or train.seed when it is 0."""
    return cfg.dataset.validation_seed or cfg.train.seed


@torch.no_grad()
def validation_loss(unet, cache: Cache, opts: LossSection, alphas_cumprod: torch.Tensor, seed: int) -> float:
    """Mean loss over every held-out image and each fixed timestep; the same weights give the same number."""
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for step in TIMESTEPS:
        step = min(max(step, opts.min_timestep), opts.max_timestep - 1)
        for x0, context, y in cache.fixed_batches(BATCH):
            noise = torch.randn(x0.shape, generator=g).to(x0.device)  # plain noise: no offset, no pyramid
            t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
            target = diffusion.v_target(x0, noise, t, alphas_cumprod) if opts.prediction == "v_prediction" else noise
            d = objective.Draw(diffusion.add_noise(x0, noise, t, alphas_cumprod), t, target)
            loss = objective.loss(unet(d.noisy, t, context, y), d, opts, alphas_cumprod)
            total += loss.item() * x0.shape[0]
            count += x0.shape[0]
    return total / count
