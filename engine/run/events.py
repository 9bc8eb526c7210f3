"""What a training run tells its host: one event per optimizer step, one per file written, and a way to stop.

Events are plain dicts of JSON values (numbers, strings, None; a path is its string), so a host forwards them
with json.dumps as they are (a web UI, a ComfyUI node's progress bar):

- `{"event": "start", "step", "total_steps", "epoch"}` once, before the first step (`step` > 0 when resuming);
- `{"event": "step", "step", "total_steps", "epoch", "loss", "lr", "steps_per_s", "peak_memory_gib"}` after each
  optimizer step (`peak_memory_gib` is None on the CPU);
- `{"event": "save", "kind", "path", "step", "epoch"}` after each file is written, `kind` being `epoch`, `step`,
  `final`, `state` or `preview`;
- `{"event": "validation", "step", "epoch", "val_loss"}` after each validation (engine/loop/validation.py).
- `{"event": "control", "request", "step", "epoch", "done", "message"}` answering a host's request (gesso.Control,
  engine/loop/control.py).

The callback stops the run by raising `StopTraining`: the state is saved and `train` returns a result with
`stopped_early`. Any other exception it raises also leaves a resumable state, and then propagates.
"""
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gesso.engine.run.logs import peak_memory_gib


class StopTraining(Exception):
    """Raised by an `on_event` callback to end the run after the current step, with its state saved for `resume`."""


class Events:
    """Sends events to the host's callback and remembers an exception the callback raised."""

    def __init__(self, on_event: Callable[[dict], None] | None, total_steps: int, device: torch.device):
        self.on_event, self.total_steps, self.device = on_event, total_steps, device
        self.raised: BaseException | None = None  # what the callback raised: the loop saves state for it
        self.stopping = False  # set while the run saves its state on the way out: a second stop is not news
        self.last = time.perf_counter()

    def emit(self, event: dict) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except StopTraining:
            if not self.stopping:
                raise
        except BaseException as e:
            self.raised = e
            raise

    def start(self, step: int, epoch: int) -> None:
        self.last = time.perf_counter()
        self.emit({"event": "start", "step": step, "total_steps": self.total_steps, "epoch": epoch})

    def measure(self, record: dict) -> dict:
        """The step event for `record` (step, epoch, loss, lr), with the rate since the last one and the peak memory,
        measured once for the log, the bar and the host; `emit` sends it."""
        now = time.perf_counter()
        event = {"event": "step", **record, "total_steps": self.total_steps,
                 "steps_per_s": 1.0 / max(now - self.last, 1e-9), "peak_memory_gib": peak_memory_gib(self.device)}
        self.last = now
        return event

    def validated(self, step: int, epoch: int, val_loss: float) -> None:
        self.emit({"event": "validation", "step": step, "epoch": epoch, "val_loss": val_loss})

    def saved(self, kind: str, path: Path, step: int, epoch: int) -> None:
        self.emit({"event": "save", "kind": kind, "path": str(path), "step": step, "epoch": epoch})
