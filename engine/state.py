"""Resumable training state: one file, written atomically, holding everything the loop needs to go on
exactly where it stopped (LoRA weights, optimizer, scheduler, loss scaler, RNG, epoch order and position)."""
from dataclasses import dataclass
from pathlib import Path

import torch

from gesso.engine.io import write_atomic

STATE_FILE = "state.pt"


@dataclass
class Position:
    """Where the loop stands after an optimizer step: the next batch to run is batch `batch` of epoch `epoch`
    (epoch orders are a pure function of the seed, so they are rebuilt, not stored)."""

    epoch: int
    batch: int
    step: int
    generator: torch.Tensor  # the noise generator's state after that step


def save_state(folder: Path, network, optimizer, scheduler, scaler, pos: Position, files: list[str], network_shape: dict) -> Path:
    state = {
        "lora": network.kohya_state_dict(torch.float32),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": pos.epoch, "batch": pos.batch, "step": pos.step, "generator": pos.generator,
        "files": files,
        "network": network_shape,
    }
    path = Path(folder) / STATE_FILE
    write_atomic(path, lambda tmp: torch.save(state, tmp))
    return path


def load_state(folder: Path) -> dict:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no resumable state (state.pt) in that folder")
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_network(network, state: dict) -> None:
    for name, m in network.modules.items():
        m.lora_down.data.copy_(state["lora"][f"{name}.lora_down.weight"])
        m.lora_up.data.copy_(state["lora"][f"{name}.lora_up.weight"])
