"""Resumable training state: one file, written atomically, holding everything the loop needs to go on
exactly where it stopped (LoRA weights, optimizer, scheduler, loss scaler, RNG, epoch order and position, and the EMA
weights with train.ema_decay; schedule-free AdamW's evaluation sequence is in its optimizer state).

A state.pt is untrusted input like any file handed to --resume: its records are checked against the CRC-32 checksums
torch.save writes into the archive (states of earlier versions carry them too), it is loaded weights-only (tensors
and plain data, never code) and every field is checked before the loop uses it, so a bad file is one TrainError line."""
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.serialization

from gesso.engine.io import write_atomic
from gesso.errors import CheckpointError, TrainError
from gesso.models.files import load_weights_only

STATE_FILE = "state.pt"
GENERATOR_BYTES = torch.Generator().get_state().numel()  # a CPU generator's state (5056 bytes)


@dataclass
class Position:
    """Where the loop stands after an optimizer step: the next batch to run is batch `batch` of epoch `epoch`
    (epoch orders are a pure function of the seed, so they are rebuilt, not stored)."""

    epoch: int
    batch: int
    step: int
    generator: torch.Tensor  # the noise generator's state after that step


def save_state(folder: Path, network, optimizer, scheduler, scaler, pos: Position, files: list[str], network_shape: dict,
               batch_shape: dict, ema: dict | None = None) -> Path:
    state = {
        "lora": network.kohya_state_dict(torch.float32),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": pos.epoch, "batch": pos.batch, "step": pos.step, "generator": pos.generator,
        "files": files,
        "network": network_shape,
        "batch_shape": batch_shape,
    } | ({"ema": ema} if ema is not None else {})
    path = Path(folder) / STATE_FILE
    write_atomic(path, lambda tmp: _torch_save(state, tmp))
    return path


def _torch_save(obj, tmp: str) -> None:
    # through a Python file: torch.save to a path reports a full disk as "unexpected pos", with no OSError behind it;
    # with the CRC-32 of every record, which load_state checks (a host may have turned them off to save faster)
    with open(tmp, "wb") as f, torch.utils.serialization.config.patch({"save.compute_crc32": True}):
        torch.save(obj, f)


def check_checksums(path: Path) -> None:
    """TrainError when a record of the state's zip archive (its pickle, or one tensor's bytes) no longer matches the
    CRC-32 torch.save wrote for it: data altered or damaged since, which torch.load itself does not notice. Costs one
    read of the file (about 0.4 s for an SDXL rank-16 state). A file that is not a zip, or one saved with checksums off
    (every CRC zero), is left to torch.load's own checks."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return
    with archive:
        records = archive.infolist()
        if not any(r.CRC for r in records):
            return
        for record in records:
            try:
                with archive.open(record) as f:  # the CRC-32 is compared once the record is read to its end
                    while f.read(1 << 24):
                        pass
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
                why = "its bytes no longer match the checksum saved with them" if "CRC" in str(e) else f"unreadable ({e})"
                raise TrainError(f"{path}: record {record.filename}: {why}; the state was altered or damaged since it "
                                 "was written (resume from a copy, or start again with --overwrite)") from None


def _count(least: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least


def _file_name(v) -> bool:
    """A bare .safetensors name in the output folder: keep_last deletes the listed files, so no path may get in."""
    return isinstance(v, str) and v.endswith(".safetensors") and Path(v).name == v and "\\" not in v


def _str_dict(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) for k in v)


def _optimizer_state(v) -> bool:
    if not (_str_dict(v) and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list)):
        return False
    return all(_str_dict(g) and isinstance(g.get("params"), list) for g in v["param_groups"])


# what each field of a state must be before the loop touches it: a file from elsewhere is caught here, by name
FIELDS = {
    "lora": (lambda v: _str_dict(v) and all(torch.is_tensor(t) for t in v.values()), "a dictionary of tensors"),
    "optimizer": (_optimizer_state, "an optimizer state (state, and param_groups listing params)"),
    "scheduler": (lambda v: _str_dict(v) and isinstance(v.get("lr_lambdas"), list) and _count(-1)(v.get("last_epoch")),
                  "a learning-rate schedule state (lr_lambdas, last_epoch)"),
    "scaler": (_str_dict, "a loss-scaler state (a dictionary)"),
    "epoch": (_count(1), "an epoch number (1 or more)"),
    "batch": (_count(0), "a batch index (0 or more)"),
    "step": (_count(0), "a step count (0 or more)"),
    "generator": (lambda v: torch.is_tensor(v) and v.dtype == torch.uint8 and tuple(v.shape) == (GENERATOR_BYTES,),
                  f"a CPU generator state (uint8 tensor of {GENERATOR_BYTES} bytes)"),
    "files": (lambda v: isinstance(v, list) and all(_file_name(f) for f in v), "a list of .safetensors file names"),
    "network": (_str_dict, "a network shape (a dictionary)"),
}
# fields added since states were first written: checked when present
OPTIONAL_FIELDS = {
    "batch_shape": (lambda v: _str_dict(v) and set(v) == {"batch_size", "batches_per_step"} and all(_count(1)(n) for n in v.values()),
              "a batch shape (batch_size, batches_per_step)"),
    "ema": (lambda v: _str_dict(v) and isinstance(v.get("decay"), float) and 0 < v["decay"] < 1
            and isinstance(v.get("shadow"), list) and all(torch.is_tensor(t) for t in v["shadow"]),
            "an EMA state (decay in (0, 1), shadow: a list of tensors)"),
}


def load_state(folder: Path) -> dict:
    """The state.pt in `folder`, loaded without running code and checked field by field; TrainError names the file."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no resumable state (state.pt) in that folder")
    check_checksums(path)
    try:
        state = load_weights_only(path)
    except CheckpointError as e:
        raise TrainError(f"{e}; --resume needs the state.pt a Gesso run wrote") from None
    if not isinstance(state, dict):
        raise TrainError(f"{path}: holds a {type(state).__name__}, not a Gesso training state")
    for key, (ok, expected) in (FIELDS | OPTIONAL_FIELDS).items():
        if key not in state and key in OPTIONAL_FIELDS:
            continue
        if key not in state:
            raise TrainError(f"{path}: not a Gesso training state: no {key!r} entry")
        if not ok(state[key]):
            raise TrainError(f"{path}: {key!r} is not {expected}")
    return state


def restore_network(network, state: dict) -> None:
    """The LoRA weights of a loaded state into `network`, after checking that every tensor is there with its shape."""
    saved = state["lora"]
    if hasattr(network, "load_state"):  # a textual-inversion network checks and loads its own vectors
        return network.load_state(saved, STATE_FILE)
    live = network.named_tensors()
    for key, param in live.items():
        if key not in saved:
            raise TrainError(f"{STATE_FILE}: lora has no {key}: the state belongs to another network")
        if saved[key].shape != param.shape:
            raise TrainError(f"{STATE_FILE}: lora {key} has shape {tuple(saved[key].shape)}, "
                             f"the network needs {tuple(param.shape)}")
    for key, param in live.items():
        param.data.copy_(saved[key])


def restore(state: dict, network, optimizer, scheduler, scaler, generator: torch.Generator) -> Position:
    """A loaded state back into this run's network, optimizer, schedule, loss scaler and noise generator, and the
    position to go on from. A state that does not fit them is one TrainError line, before any step runs."""
    restore_network(network, state)
    saved = state["optimizer"]["param_groups"]
    if [len(g["params"]) for g in saved] != [len(g["params"]) for g in optimizer.param_groups]:
        raise TrainError(f"{STATE_FILE}: optimizer state for parameter groups of {[len(g['params']) for g in saved]}, "
                         f"this run has {[len(g['params']) for g in optimizer.param_groups]}")
    # hyperparameters this optimizer does not have: the state is another optimizer's, which would fail at its first
    # step (keys it lacks are fine: torch fills those it added since for states written by an older version)
    foreign = sorted({k for g in saved for k in g} - {k for g in optimizer.param_groups for k in g})
    if foreign:
        raise TrainError(f"{STATE_FILE}: the optimizer state is another optimizer's (it has {', '.join(foreign)}); "
                         "resume with the train.optimizer the run was started with")
    if scaler.is_enabled() and not state["scaler"]:
        raise TrainError(f"{STATE_FILE}: written without fp16 loss scaling; resume with the train.mixed_precision "
                         "the run was started with")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:  # what torch raises for a dict that does not fit
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TrainError(f"{STATE_FILE}: does not fit this run ({e.__class__.__name__}: {first})") from None
    generator.set_state(state["generator"])
    return Position(state["epoch"], state["batch"], state["step"], state["generator"])
