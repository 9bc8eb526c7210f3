"""What the GPU can do, as the kernels need it: compute capability, per-block shared memory, bf16 and fp8 support,
and the training precision that `train.mixed_precision = "auto"` resolves to.

Everything is read from `torch.cuda.get_device_properties` once per device index (tests stub that function).
`SHARED_MEMORY_OPTIN` holds the same limit per target for the ahead-of-time compile check, which has no device:
the per-block opt-in shared memory Triton compares a kernel's `metadata.shared` with before launching it.
"""
import functools
from dataclasses import dataclass

import torch

# bytes per block, opt-in, by compute capability (CUDA's occupancy tables; REFERENCE.md "GPU targets")
SHARED_MEMORY_OPTIN = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448, 120: 101376}
BF16_CAPABILITY = (8, 0)  # bf16 tensor cores; Turing (7.5) has fp16 ones only
FP8_CAPABILITY = (8, 9)  # tl.float8e4nv compiles for sm_89 and up
PRECISIONS = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    capability: tuple[int, int]
    shared_memory: int  # per-block opt-in bytes
    memory_gib: float

    @property
    def arch(self) -> int:
        """The target number Triton and ptxas use: sm_89 -> 89."""
        return 10 * self.capability[0] + self.capability[1]

    @property
    def bf16(self) -> bool:
        return self.capability >= BF16_CAPABILITY

    @property
    def fp8(self) -> bool:
        return self.capability >= FP8_CAPABILITY


def gpu(device: torch.device) -> GPU:
    """The properties of a CUDA device (the current one when it carries no index)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _gpu(index)


@functools.cache
def _gpu(index: int) -> GPU:
    p = torch.cuda.get_device_properties(index)
    return GPU(index, p.name, (p.major, p.minor), p.shared_memory_per_block_optin, p.total_memory / 2**30)


def precision(mode: str, device: torch.device) -> str:
    """`mixed_precision` with "auto" resolved for `device`: bf16 where the GPU has bf16 tensor cores (sm_80 and up),
    fp16 (trained with the loss scaler) on older GPUs such as Turing, fp32 ("no") on the CPU. Other modes pass."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "no"
    return "bf16" if gpu(device).bf16 else "fp16"
