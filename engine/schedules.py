"""Learning-rate schedules: pure multiplier functions of the step, wrapped in a LambdaLR.

The formulas are those of diffusers' and transformers' `get_scheduler` (diffusers
`optimization.py`, transformers `optimization.py`), so a schedule named in a kohya or diffusers
config means the same curve here. Each multiplier scales every param group's own base lr, so the
UNet / text-encoder split is kept. The scheduler is stepped once per optimizer step.
"""
import math
from functools import partial

import torch


def constant(step: int) -> float:
    """m(t) = 1."""
    return 1.0


def constant_with_warmup(step: int, warmup_steps: int) -> float:
    """m(t) = t / max(1, W) for t < W, else 1."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return 1.0


def linear(step: int, warmup_steps: int, total_steps: int) -> float:
    """Warmup, then m(t) = max(0, (T - t) / max(1, T - W)): 1 at the end of warmup, 0 at T."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Warmup, then m(t) = max(0, (1 + cos(pi p)) / 2) with p = (t - W) / max(1, T - W): a half cosine to 0."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_with_restarts(step: int, warmup_steps: int, total_steps: int, num_cycles: int) -> float:
    """Warmup, then m(t) = (1 + cos(pi ((C p) mod 1))) / 2 for p < 1, else 0: C half cosines, each restarting at 1."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))


# name -> its multiplier for (warmup_steps, total_steps, num_cycles): the one list of schedule names
SCHEDULES = {
    "constant": lambda warmup, total, cycles: constant,
    "constant_with_warmup": lambda warmup, total, cycles: partial(constant_with_warmup, warmup_steps=warmup),
    "cosine": lambda warmup, total, cycles: partial(cosine, warmup_steps=warmup, total_steps=total),
    "cosine_with_restarts": lambda warmup, total, cycles: partial(cosine_with_restarts, warmup_steps=warmup,
                                                                  total_steps=total, num_cycles=cycles),
    "linear": lambda warmup, total, cycles: partial(linear, warmup_steps=warmup, total_steps=total),
}


def build_schedule(
    name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, num_cycles: int = 1
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose multiplier at optimizer step t is the named function above.

    `constant` ignores warmup, as in diffusers; `num_cycles` only applies to `cosine_with_restarts`
    (plain `cosine` is one half cosine, as diffusers' `get_scheduler` builds it).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r} (known: {', '.join(SCHEDULES)})")
    if total_steps < 1 or warmup_steps < 0 or num_cycles < 1:
        raise ValueError(f"lr schedule needs total_steps >= 1, warmup_steps >= 0, num_cycles >= 1; got {total_steps}, {warmup_steps}, {num_cycles}")
    multiplier = SCHEDULES[name](warmup_steps, total_steps, num_cycles)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
