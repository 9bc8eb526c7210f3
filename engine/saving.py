"""Writing a run's files: the LoRA per epoch, per N steps and at the end (pruned to keep_last), and the resumable state."""
from pathlib import Path

import torch

from gesso.engine.config import Config
from gesso.engine.events import Events
from gesso.engine.lora.files import save_lora
from gesso.engine.lora.metadata import at_save
from gesso.engine.state import STATE_FILE, Position, save_state
from gesso.errors import TrainError

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Saver:
    """Writes the LoRA files (per epoch, per N steps, final), prunes old ones, and keeps the resumable state."""

    def __init__(self, cfg: Config, output_dir: Path, network, meta: dict[str, str], files: list[str], events: Events):
        self.cfg, self.dir, self.network, self.meta, self.events = cfg, output_dir, network, meta, events
        self.dtype = SAVE_DTYPES[cfg.output.save_dtype]
        self.files = list(files)  # intermediate files written so far, oldest first

    def lora(self, path: Path, epoch: int, step: int) -> Path:
        tensors = self.network.kohya_state_dict(self.dtype)
        require_finite(tensors, path, step)
        write = getattr(self.network, "write", save_lora)  # an embedding network writes its own file layout
        write(path, tensors, at_save(self.meta, epoch, step))
        return path

    def final(self, path: Path, epoch: int, step: int) -> Path:
        self.events.saved("final", self.lora(path, epoch, step), step, epoch)
        return path

    def intermediate(self, stem: str, epoch: int, step: int) -> Path:
        path = self.lora(self.dir / f"{self.cfg.output.name}-{stem}.safetensors", epoch, step)
        self.files.append(path.name)
        keep = self.cfg.output.keep_last
        while keep and len(self.files) > keep:
            (self.dir / self.files.pop(0)).unlink(missing_ok=True)
        # the event goes out once the file list is final: a host that stops here leaves a state that knows the file
        self.events.saved("step" if stem.startswith("step") else "epoch", path, step, epoch)
        return path

    def state(self, optimizer, scheduler, scaler, pos: Position) -> None:
        # the live weights, not a copy: save_state makes the one copy the file needs
        live = self.network.named_tensors()
        require_finite(live, self.dir / STATE_FILE, pos.step)
        path = save_state(self.dir, self.network, optimizer, scheduler, scaler, pos, self.files, network_shape(self.cfg))
        self.events.saved("state", path, pos.step, pos.epoch)

    def state_if_asked(self, optimizer, scheduler, scaler, pos: Position) -> None:
        """The state at a save point, unless output.save_state is off (a stop or an interrupt saves it regardless)."""
        if self.cfg.output.save_state:
            self.state(optimizer, scheduler, scaler, pos)


def network_shape(cfg: Config) -> dict:
    n = cfg.network
    shape = {"rank": n.rank, "alpha": n.alpha, "conv_rank": n.conv_rank, "conv_alpha": n.conv_alpha}
    shape |= {"train_text_encoders": True} if n.train_text_encoders else {}  # states saved before the option still match
    return shape | ({"type": n.type} if n.type != "lora" else {})


def require_finite(tensors: dict[str, torch.Tensor], path: Path, step: int) -> None:
    """Refuse to write weights holding NaN or Inf (a diverged step, or fp16 overflowing in save_dtype): the earlier
    files stay the last good ones instead of being followed by a file no tool can use."""
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise TrainError(f"{path}: not written, {key} holds NaN/Inf at step {step}; the earlier files are the last good ones "
                             "(lower train.learning_rate, or save_dtype = 'bf16'/'fp32' if fp16 overflowed)")
