"""Run logs: metrics.jsonl (one JSON object per optimizer step, and one per validation: step, epoch, val_loss),
TensorBoard scalars (loss, lr, it/s, peak memory, val_loss)
and the preview images (tag preview/NN, at the step they were rendered after).

metrics.jsonl is the record: a row that cannot be written ends the run with an OutputError. TensorBoard is a
view of the same numbers, so a TensorBoard folder that cannot be written is one warning and the run goes on.
"""
import contextlib
import io
import json
import logging
import os
import time
from pathlib import Path

import torch

from gesso.engine.io import output_error, write_bytes_atomic

log = logging.getLogger("gesso.logs")


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory so far in GiB; None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def kept_rows(path: Path, upto: int) -> list[bytes]:
    """The rows of an earlier metrics.jsonl up to step `upto`, as they are written. A run killed mid-write
    leaves its last line cut (no newline, half a JSON object): that line goes, with every row past the state."""
    if not upto or not path.exists():
        return []
    *complete, cut = path.read_bytes().split(b"\n")
    rows, unreadable = [], 0
    for line in filter(bytes.strip, complete):
        try:
            if json.loads(line)["step"] <= upto:
                rows.append(line)
        except (ValueError, TypeError, KeyError):
            unreadable += 1
    if cut or unreadable:
        log.warning("%s: dropped %d unreadable row(s) (a run killed mid-write cuts its last row)", path, unreadable + bool(cut))
    return rows


class RunLog:
    """Appends each step's record to metrics.jsonl (cut back to `from_step` on resume) and to TensorBoard, from `open()`
    on; until then (an --overwrite run that has not written its first file) it keeps them in memory."""

    def __init__(self, folder: Path, from_step: int, tensorboard: bool):
        self.folder, self.from_step, self.tensorboard = folder, from_step, tensorboard
        self.path = folder / "metrics.jsonl"
        self.file, self.board = None, None
        self.waiting: list[tuple[str, tuple]] = []  # (method, arguments) logged before open()

    def open(self) -> None:
        # resuming: drop rows past the state, so no step appears twice; rewritten atomically, so a full disk or
        # a kill here leaves the earlier rows as they were
        write_bytes_atomic(self.path, b"".join(row + b"\n" for row in kept_rows(self.path, self.from_step)))
        try:
            self.file = open(self.path, "a")
        except OSError as e:
            raise output_error(self.path, e) from e
        self.board = Board(self.folder / "tensorboard", self.from_step) if self.tensorboard else None
        for method, args in self.waiting:
            getattr(self, method)(*args)
        self.waiting = []

    def step(self, record: dict, steps_per_s: float, peak_memory_gib: float | None) -> None:
        """`record` (step, epoch, loss, lr) as a metrics.jsonl row; TensorBoard also gets the rate and peak memory the
        step event measured (engine/run/events.py), so the log, the bar and the host show the same numbers."""
        if self.file is None:
            self.waiting.append(("step", (record, steps_per_s, peak_memory_gib)))
            return
        self._row(record)
        if self.board:
            scalars = {"loss": record["loss"], "lr": record["lr"], "it_per_s": steps_per_s}
            if peak_memory_gib is not None:
                scalars["peak_memory_gib"] = peak_memory_gib
            self.board.add(record["step"], scalars)

    def validation(self, step: int, epoch: int, val_loss: float) -> None:
        """The validation loss as a metrics.jsonl row of its own ({"step", "epoch", "val_loss"}) and a scalar."""
        if self.file is None:
            self.waiting.append(("validation", (step, epoch, val_loss)))
            return
        self._row({"step": step, "epoch": epoch, "val_loss": val_loss})
        if self.board:
            self.board.add(step, {"val_loss": val_loss})

    def _row(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            raise output_error(self.path, e) from e

    def image(self, tag: str, image, step: int) -> None:
        """A preview (a PIL image) for TensorBoard's Images tab; metrics.jsonl records no images."""
        if self.file is None:
            self.waiting.append(("image", (tag, image, step)))
        elif self.board:
            self.board.add_image(tag, image, step)

    def close(self) -> None:
        # every row was flushed in step(): closing can only fail on a row step() has already reported
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
        if self.board:
            self.board.close()


class Board:
    """TensorBoard scalars written in this thread. tensorboardX's SummaryWriter writes from a worker thread that
    dies with a traceback on a full disk, and then its bounded queue blocks the training loop for good."""

    def __init__(self, folder: Path, from_step: int):
        # protobuf and all: loaded only when a run asks for TensorBoard
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary

        self.folder, self.event, self.summary = folder, Event, Summary
        self.writer = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # the pid in the name: a run resumed within the same second must not truncate the earlier run's file
            earlier = any(folder.glob("events.*"))
            self.writer = EventsWriter(str(folder / "events"), f".{os.getpid()}")
            # TensorBoard hides the earlier files' steps past this one: a resumed (or restarted) run rewrites them
            if from_step or earlier:
                self.writer.write_event(Event(step=from_step + 1, session_log=SessionLog(status=SessionLog.START)))
            self.writer.flush()
        except OSError as e:
            self._failed(e)

    def add(self, step: int, scalars: dict[str, float]) -> None:
        self._write(step, self.summary(value=[self.summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]))

    def add_image(self, tag: str, image, step: int) -> None:
        """The image as a PNG in an image summary, as TensorBoard reads it (height, width, 3 channels for RGB)."""
        png = io.BytesIO()
        image.convert("RGB").save(png, format="PNG")
        picture = self.summary.Image(height=image.height, width=image.width, colorspace=3, encoded_image_string=png.getvalue())
        self._write(step, self.summary(value=[self.summary.Value(tag=tag, image=picture)]))

    def _write(self, step: int, summary) -> None:
        if self.writer is None:
            return
        try:
            self.writer.write_event(self.event(wall_time=time.time(), step=step, summary=summary))
            self.writer.flush()
        except OSError as e:
            self._failed(e)

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(OSError):  # every event was flushed in _write()
                self.writer.close()

    def _failed(self, e: OSError) -> None:
        log.warning("tensorboard: cannot write in %s (%s); the run goes on without it, metrics.jsonl has the same scalars",
                    self.folder, e.strerror or e)
        if self.writer is not None:
            with contextlib.suppress(OSError):
                self.writer.close()
        self.writer = None
