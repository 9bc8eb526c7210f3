"""Writing a run's files: the LoRA per epoch, per N steps, per N minutes and at the end (pruned to keep_last), and
the resumable state. Under torchrun only rank 0 writes; the other ranks go through the same calls writing nothing."""
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gesso.engine.config.sections import Config
from gesso.engine.lora.files import save_lora
from gesso.engine.run.events import Events
from gesso.engine.run.metadata import at_save
from gesso.engine.run.state import STATE_FILE, Position, save_state
from gesso.errors import TrainError

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Saver:
    """Writes the LoRA files (per epoch, per N steps, final), prunes old ones, and keeps the resumable state."""

    def __init__(self, cfg: Config, output_dir: Path, network, meta: dict[str, str], files: list[str], events: Events,
                 processes: int = 1, writes: bool = True, clock: Callable[[], float] = time.monotonic,
                 evaluating: Callable = contextlib.nullcontext, ema=None, before_write: Callable[[], None] = lambda: None):
        self.cfg, self.dir, self.network, self.meta, self.events = cfg, output_dir, network, meta, events
        # LoRA files hold the weights the run shows (EMA, schedule-free's evaluation ones): `evaluating` puts them in
        # place; the state holds the training weights and the EMA's own state
        self.evaluating, self.ema = evaluating, ema
        self.dtype = SAVE_DTYPES[cfg.output.save_dtype]
        self.files = list(files)  # intermediate files written so far, oldest first
        self.batch = batch_shape(cfg, processes)  # stored in the state, checked on resume
        self.writes = writes  # rank 0 (or the only process); the others write nothing
        self.clock, self.last_state = clock, clock()  # output.save_every_n_minutes counts from the last state saved
        self.before_write = before_write  # the run folder's Claim.prove: an --overwrite's earlier files go at the first

    def lora(self, path: Path, epoch: int, step: int) -> Path:
        with self.evaluating():  # a copy: fp32 tensors on the CPU are the live parameters, which it then restores
            tensors = {k: t.clone() for k, t in self.network.kohya_state_dict(self.dtype).items()}
        raw = {path.with_name(f"{path.stem}-non-ema.safetensors"): self.network.kohya_state_dict(self.dtype)} \
            if self.cfg.output.save_non_ema else {}
        for where, t in {path: tensors, **raw}.items():
            require_finite(t, where, step)  # on every rank (their weights are the same): all stop together
        if self.writes:
            self.before_write()
            write = getattr(self.network, "write", save_lora)  # an embedding network writes its own file layout
            for where, t in {**raw, path: tensors}.items():  # the file named in events and `files` last
                write(where, t, at_save(self.meta, epoch, step))
        return path

    def final(self, path: Path, epoch: int, step: int) -> Path:
        self.lora(path, epoch, step)
        if self.writes:
            self.events.saved("final", path, step, epoch)
        return path

    def intermediate(self, stem: str, epoch: int, step: int) -> Path:
        path = self.lora(self.dir / f"{self.cfg.output.name}-{stem}.safetensors", epoch, step)
        if not self.writes:
            return path
        if path.name in self.files:  # a file a restarted run kept from its killed start, written again
            self.files.remove(path.name)
        self.files.append(path.name)
        keep = self.cfg.output.keep_last
        while keep and len(self.files) > keep:
            old = self.dir / self.files.pop(0)
            old.unlink(missing_ok=True)
            old.with_name(f"{old.stem}-non-ema.safetensors").unlink(missing_ok=True)
        # the event goes out once the file list is final: a host that stops here leaves a state that knows the file
        self.events.saved("step" if stem.startswith("step") else "epoch", path, step, epoch)
        return path

    def step_file(self, epoch: int, step: int) -> Path | None:
        """The step's `<name>-step<N>.safetensors`, unless this step already wrote it (a step save, a timed save and a
        host's save-now may meet on one step): the path, or None."""
        stem = f"step{step:08d}"
        if f"{self.cfg.output.name}-{stem}.safetensors" in self.files:
            return None
        return self.intermediate(stem, epoch, step)

    def state(self, optimizer, scheduler, scaler, pos: Position) -> None:
        # the live weights, not a copy: save_state makes the one copy the file needs
        live = self.network.named_tensors()
        require_finite(live, self.dir / STATE_FILE, pos.step)
        self.last_state = self.clock()
        if not self.writes:
            return
        self.before_write()
        path = save_state(self.dir, self.network, optimizer, scheduler, scaler, pos, self.files, network_shape(self.cfg),
                          self.batch, None if self.ema is None else self.ema.state_dict())
        self.events.saved("state", path, pos.step, pos.epoch)

    def state_if_asked(self, optimizer, scheduler, scaler, pos: Position) -> None:
        """The state at a save point, unless output.save_state is off (a stop or an interrupt saves it regardless)."""
        if self.cfg.output.save_state:
            self.state(optimizer, scheduler, scaler, pos)

    def on_clock(self, optimizer, scheduler, scaler, pos: Position, total_steps: int) -> None:
        """After an optimizer step: the state (and with output.timed_lora the step's LoRA file) once
        output.save_every_n_minutes have passed since the last state saved; none at the last step, which the final
        file follows. A cloud notebook cut off after hours loses at most those minutes."""
        minutes = self.cfg.output.save_every_n_minutes
        if not minutes or pos.step >= total_steps or self.clock() - self.last_state < minutes * 60:
            return
        if self.cfg.output.timed_lora:
            self.step_file(pos.epoch, pos.step)
        self.state(optimizer, scheduler, scaler, pos)


def batch_shape(cfg: Config, processes: int) -> dict:
    """What a state's position counts in: batches of batch_size, batches_per_step of them per optimizer step
    (processes x gradient_accumulation_steps). A resume must keep both; the number of processes may change."""
    return {"batch_size": cfg.train.batch_size, "batches_per_step": processes * cfg.train.gradient_accumulation_steps}


def check_resumable(state: dict, cfg: Config, processes: int, folder: Path) -> None:
    """TrainError when a loaded state belongs to another network, counts its position in other batches, or keeps
    another EMA (or none)."""
    expected = network_shape(cfg)
    if state["network"] != expected:
        raise TrainError(f"{folder}: state was trained with network {state['network']}, the config says {expected}")
    saved, now = state.get("batch_shape"), batch_shape(cfg, processes)
    if saved is not None and saved != now:  # states written before this field have none: not checked
        raise TrainError(f"{folder}: state was trained with batch_size {saved['batch_size']} and {saved['batches_per_step']} "
                         f"batches per step (processes x train.gradient_accumulation_steps); this run has "
                         f"batch_size {now['batch_size']} and {now['batches_per_step']} ({processes} process(es) x "
                         f"{cfg.train.gradient_accumulation_steps}): keep the effective batch to resume")
    saved, now = state["ema"]["decay"] if "ema" in state else 0.0, cfg.train.ema_decay
    if saved != now:  # the EMA goes on from its shadows: with another decay (or none) the files are another run's
        raise TrainError(f"{folder}: state was trained with train.ema_decay = {saved} (0: off), this run has {now}; "
                         "resume with the train.ema_decay the run was started with")


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
