"""Choose the Triton kernel or the PyTorch reference for a call.

`GESSO_KERNELS` = `auto` (default) | `triton` | `reference`. In `auto`, CUDA tensors on a GPU of
compute capability >= 8.0 take the Triton kernels and everything else takes the reference.
`triton` forces the kernels even for CPU tensors (the interpreter tests: `TRITON_INTERPRET=1`).
This is the only place below cli.py that reads the environment.
"""
import os
import sys

import torch

ENV_VAR = "GESSO_KERNELS"
MODES = ("auto", "triton", "reference")
MIN_CAPABILITY = (8, 0)  # bf16 tensor cores and the Triton features these kernels assume

_noticed: set = set()  # (GPU index, minimum) pairs already announced


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


def use_triton(*tensors: torch.Tensor, min_capability: tuple = MIN_CAPABILITY) -> bool:
    """True when the call with these tensors should run the Triton kernel (on a GPU of min_capability)."""
    mode = kernel_mode()
    if mode != "auto":
        return mode == "triton"
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        return False
    (device,) = devices
    return device.type == "cuda" and _capable(device, min_capability)


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
