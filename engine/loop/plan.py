"""How a run's images become optimizer steps: batches per epoch, accumulation over processes, and the steps line
printed at the start (images, repeats, batch, steps per epoch and in all, and the images held out for validation)."""
import math
from dataclasses import dataclass, field
from pathlib import Path

from gesso.engine.data.dataset import Dataset


@dataclass
class Plan:
    """Optimizer steps: batches per epoch (bucket-pure, so a bucket's last batch may be short) over the batches each
    step takes, accumulation on each of `processes` (torchrun's world size)."""

    dataset: Dataset
    batch_size: int
    epochs: int
    accumulation: int = 1
    processes: int = 1
    validation: list[Path] = field(default_factory=list)  # the held-out images, named in the steps line

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.steps_per_epoch(self.batch_size)

    @property
    def batches_per_step(self) -> int:
        return self.accumulation * self.processes

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.batches_per_step)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def describe(self) -> str:
        d = self.dataset
        repeats = sorted({it.repeats for it in d.items if not it.is_reg})
        rep = f"{repeats[0]} repeats" if len(repeats) == 1 else "repeats"
        accum = f" / accumulation {self.accumulation}" if self.accumulation > 1 else ""
        if self.processes > 1:
            accum = f" / ({self.processes} processes x accumulation {self.accumulation})"
        processes = f"{self.processes} process{'es' if self.processes > 1 else ''}"
        effective = (f" (effective batch {self.batch_size} x {processes} x {self.accumulation} accumulation"
                     f" = {self.batch_size * self.batches_per_step})" if self.batches_per_step > 1 else "")
        reg = d.samples(True)  # kohya counts regularization samples into an epoch's batches too
        samples = f"{d.samples(False)} samples + {reg} regularization samples = {len(d)}" if reg else f"{len(d)} samples"
        train = sum(not it.is_reg for it in d.items)
        held = (f"; {len(self.validation)} images held out for validation: {', '.join(p.name for p in self.validation)}"
                if self.validation else "")
        return (f"{train} images x {rep} = {samples} / batch {self.batch_size}{accum} = {self.steps_per_epoch} steps per epoch"
                f" x {self.epochs} epochs = {self.total_steps} steps{effective}{held}")
