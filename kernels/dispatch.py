"""Choose the Triton kernel or the PyTorch reference for a call.

`GESSO_KERNELS` = `auto` (default) | `triton` | `reference`. In `auto`, CUDA tensors on a GPU of
compute capability >= 8.0 take the Triton kernels and everything else takes the reference; fp32 tensors take the
reference's cuBLAS matmuls and SDPA too (fp32 Triton dots run in IEEE fp32, without tensor cores, and spill).
`triton` forces the kernels even for CPU tensors (the interpreter tests: `TRITON_INTERPRET=1`).
This is the only place below cli.py that reads the environment (with kernels/fallback.py, which finds the per-user
cache folder). In `auto`, a kernel that failed or disagreed on this GPU runs its reference (kernels/fallback.py).

`auto` never picks a kernel that lost on this GPU: `dispatch_table.json` beside this file lists, per device
name, op and shape key, the path a GPU session measured to be faster there ("triton" or "reference", with both
times). Shapes and devices it does not list take the kernel (fp32: the reference). Only measurements go in it
(`benchmarks/dispatch_table.py` writes it on a GPU); it is absent until one has run.
"""
import functools
import json
import os
import sys
from pathlib import Path

import torch

ENV_VAR = "GESSO_KERNELS"
MODES = ("auto", "triton", "reference")
MIN_CAPABILITY = (8, 0)  # bf16 tensor cores and the Triton features these kernels assume
DOT_OPS = ("lora_linear", "attention")  # matmul kernels, which fp32 would run without tensor cores

TABLE = Path(__file__).with_name("dispatch_table.json")
CHOICES = ("triton", "reference")

_noticed: set = set()  # (GPU index, minimum) pairs already announced
_recording: list = []  # sets collecting (op, key) of every dispatch decision, innermost last (see `recorded`)


def kernel_mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def _capable(device: torch.device, minimum: tuple = MIN_CAPABILITY) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability >= minimum:
        return True
    if (index, minimum) not in _noticed:
        _noticed.add((index, minimum))
        print(f"gesso: GPU {index} has compute capability {capability[0]}.{capability[1]} < "
              f"{minimum[0]}.{minimum[1]}; using the PyTorch reference kernels", file=sys.stderr)
    return False


def shape_key(*parts) -> str:
    """`shape_key(4096, 640, 640, 16, torch.bfloat16)` -> "4096-640-640-16-bfloat16": one table row's name."""
    return "-".join(str(p).removeprefix("torch.") for p in parts)


def load_table() -> dict:
    """{device name: {"measured": {...}, "ops": {op: {shape key: {"use": "triton" | "reference", ...}}}}};
    {} without a table file."""
    return _read_table(TABLE)


@functools.cache
def _read_table(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        devices = json.loads(path.read_text())["devices"]
        for device in devices.values():
            for op, rows in device["ops"].items():
                for key, row in rows.items():
                    if row["use"] not in CHOICES:
                        raise ValueError(f"{op} {key}: use={row['use']!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a dispatch table ({e})") from None
    return devices


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def table_choice(device: torch.device, op: str, key: str) -> str | None:
    """The path the table names for `op` at `key` on this GPU, or None where it has no entry."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    rows = load_table().get(_device_name(index), {}).get("ops", {}).get(op, {})
    return rows[key]["use"] if key in rows else None


class recorded:
    """`with recorded() as seen:` collects (op, shape key) of every table-keyed dispatch inside the block."""

    def __enter__(self) -> set:
        _recording.append(set())
        return _recording[-1]

    def __exit__(self, *exc):
        _recording.pop()


def use_triton(*tensors: torch.Tensor, min_capability: tuple = MIN_CAPABILITY, op: str | None = None,
               key: str | None = None) -> bool:
    """True when the call with these tensors (the first one sets the dtype) should run the Triton kernel: forced by
    GESSO_KERNELS, else under `auto` as `_auto_kernel` decides."""
    if op is not None and _recording:
        _recording[-1].add((op, key))
    mode = kernel_mode()
    if mode != "auto":
        return mode == "triton"
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        return False
    (device,) = devices
    return _auto_kernel(device, tensors[0].dtype, min_capability, op, key)


def _auto_kernel(device: torch.device, dtype: torch.dtype, min_capability: tuple, op: str | None, key: str | None) -> bool:
    """`auto`: a GPU of min_capability, and not where the dispatch table measured `op` at shape `key` slower than the
    reference on this GPU; fp32 matmul kernels only where the table measured them faster."""
    if device.type != "cuda" or not _capable(device, min_capability):
        return False
    choice = table_choice(device, op, key) if op is not None else None
    if dtype == torch.float32 and op in DOT_OPS:
        return choice == "triton"
    return choice != "reference"


def autocast_inputs(x: torch.Tensor, *others):
    """x and `others` (None passes) in autocast's dtype when autocast is on for x's device, else as they are.

    The kernels are autograd Functions, which autocast does not see: without this, under CUDA autocast a
    LoRA linear after a LayerNorm (which autocast runs in fp32) would get fp32 activations and run its
    matmuls in fp32. Like F.linear and SDPA under autocast, the kernels compute in the autocast dtype.
    """
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return (x, *others)  # (the meta device has no autocast at all)
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in (x, *others))


class forced:
    """`with forced("reference"):` runs a block under one kernel mode (benchmarks compare both in one process)."""

    def __init__(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"kernel mode {mode!r}: expected one of {', '.join(MODES)}")
        self.mode, self.saved = mode, None

    def __enter__(self):
        self.saved = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = self.mode

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = self.saved
