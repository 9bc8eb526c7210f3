"""Run logs: metrics.jsonl (one JSON object per optimizer step) and TensorBoard scalars (loss, lr, it/s, peak memory)."""
import json
import time
from pathlib import Path

import torch


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory so far in GiB; None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class RunLog:
    """Appends each step's record to metrics.jsonl (truncated to `from_step` on resume) and to TensorBoard."""

    def __init__(self, folder: Path, from_step: int, tensorboard: bool, device: torch.device):
        path = folder / "metrics.jsonl"
        rows = []
        if from_step and path.exists():  # resuming: drop rows past the state, so no step appears twice
            rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= from_step]
        self.file = open(path, "w")
        self.file.writelines(line + "\n" for line in rows)
        self.file.flush()
        self.device = device
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # protobuf and all: loaded only when a run asks for TensorBoard

            self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=from_step + 1 if from_step else None)
        self.last = time.perf_counter()

    def step(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        now = time.perf_counter()
        if self.writer:
            step = record["step"]
            self.writer.add_scalar("loss", record["loss"], step)
            self.writer.add_scalar("lr", record["lr"], step)
            self.writer.add_scalar("it_per_s", 1.0 / max(now - self.last, 1e-9), step)
            peak = peak_memory_gib(self.device)
            if peak is not None:
                self.writer.add_scalar("peak_memory_gib", peak, step)
        self.last = now

    def close(self) -> None:
        self.file.close()
        if self.writer:
            self.writer.close()
