"""The training engine: foundations at this level (atomic writes, diffusion maths, optimizers, LR schedules), the rest in rooms."""
