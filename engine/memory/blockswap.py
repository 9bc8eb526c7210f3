"""Block swap: the frozen weights of N UNet units live in host memory and visit the device one unit at a time.

A unit is a res-block or a transformer block (models/unet.py `Unit`; SDXL has 87). The N largest by weight
bytes are swapped: their frozen parameters and buffers (fp8 codes and scales included, never the LoRA
parameters, which the optimizer updates on the device) are moved to pinned host memory and replaced by None
in their modules. A forward pre-hook copies a unit's weights in just before it runs and the hook after it
drops them; meanwhile the next swapped unit's copy is already under way on a side CUDA stream, so copies
overlap compute. Backward needs gradient checkpointing: a hook on each unit's output loads the unit when its
backward begins (its recomputation's pre-hook too), and prefetches the one before it.

Why it is safe: a unit's weights are fresh tensors each time they are installed. What autograd saved holds
its own reference, so a dropped copy is freed only when nothing needs it; the fp8 conv, which reads its
module's codes in backward (engine/memory/fp8.py), finds them installed because a unit stays installed from the start
of its backward until the backward of a unit two places before it begins. By then its backward is done: each
unit's output reaches every later unit, so an earlier unit's backward waits for theirs (two places, not one:
a checkpoint recomputes up to two consecutive units, models/unet.py). On the GPU, each copy is recorded on
the compute stream, so the caching allocator never reuses its memory while a kernel may still read it.

On the CPU the same code runs with the CPU as both host and device (copies, no streams); on the meta device
(engine/memory/memtrace.py) the copies are allocations that the predictor counts.
"""
import functools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from gesso.errors import ConfigError


@dataclass(frozen=True)
class Slot:
    """One frozen tensor of a swapped unit: where it lives in its module, and its host copy."""

    module: nn.Module
    table: str  # "_parameters" or "_buffers"
    name: str
    host: torch.Tensor


def frozen_bytes(module: nn.Module) -> int:
    tensors = [p for p in module.parameters() if not p.requires_grad] + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _slots(unit: nn.Module, pin: bool) -> list[Slot]:
    slots = []
    for module in unit.modules():
        for table in ("_parameters", "_buffers"):
            for name, t in getattr(module, table).items():
                if t is None or t.requires_grad:
                    continue
                host = t.detach() if t.device.type == "meta" else t.detach().cpu()
                slots.append(Slot(module, table, name, host.pin_memory() if pin else host))
    return slots


class BlockSwap:
    """Swaps the frozen weights of the `n` largest units of `unet` between host memory and `device`.

    Attach it before the UNet goes to the device (`unet.to(device)` then moves only what is resident). The
    LoRA must already be injected and fp8 bases quantised: the swapped tensors are the modules' at attach time.
    `live_bytes` / `peak_bytes`: the device copies alive now and at most, the swap buffers.
    """

    def __init__(self, unet: nn.Module, n: int, device: torch.device):
        units = unet.units()
        if not 0 < n <= len(units):
            raise ConfigError(f"train.blocks_to_swap = {n}: this UNet has {len(units)} blocks (res-blocks and transformer blocks)")
        if not unet.gradient_checkpointing:
            raise ConfigError("train.blocks_to_swap needs train.gradient_checkpointing = true (backward reloads blocks in its recomputation)")
        largest = sorted(range(len(units)), key=lambda i: (-frozen_bytes(units[i]), i))[:n]
        self.index = sorted(largest)  # unit indices of the swapped units, in forward order
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.slots = [_slots(units[i], pin=cuda) for i in self.index]
        self.host_bytes = sum(s.host.numel() * s.host.element_size() for slots in self.slots for s in slots)
        self.installed: set[int] = set()
        self.pending: dict[int, tuple[list[torch.Tensor], object]] = {}  # copies under way: tensors, CUDA event
        self.live_bytes = self.peak_bytes = 0
        for k, i in enumerate(self.index):
            self._uninstall(k)
            units[i].register_forward_pre_hook(functools.partial(self._before, k))
            units[i].register_forward_hook(functools.partial(self._after, k))

    def _copy(self, k: int) -> None:
        """Start copying unit k's weights to the device (on the side stream on a GPU)."""
        if k in self.pending or k in self.installed or not 0 <= k < len(self.slots):
            return
        event = None
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                tensors = [torch.empty_like(s.host, device=self.device).copy_(s.host, non_blocking=True) for s in self.slots[k]]
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            tensors = [torch.empty_like(s.host, device=self.device).copy_(s.host) for s in self.slots[k]]
        for t in tensors:
            self._count(t)
        self.pending[k] = (tensors, event)

    def _count(self, t: torch.Tensor) -> None:
        size = t.untyped_storage().nbytes()
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(t.untyped_storage(), self._freed, size)

    def _freed(self, size: int) -> None:
        self.live_bytes -= size

    def _install(self, k: int) -> None:
        if k in self.installed:
            return
        self._copy(k)
        tensors, event = self.pending.pop(k)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t in tensors:
                t.record_stream(compute)
        for s, t in zip(self.slots[k], tensors):
            getattr(s.module, s.table)[s.name] = nn.Parameter(t, requires_grad=False) if s.table == "_parameters" else t
        self.installed.add(k)

    def _uninstall(self, k: int) -> None:
        for s in self.slots[k]:
            getattr(s.module, s.table)[s.name] = None  # what autograd saved keeps its own reference
        self.installed.discard(k)

    def _backward_reaches(self, k: int, grad: torch.Tensor | None = None) -> None:
        """Unit k's backward begins (its output's gradient is there) or its recomputation does: load it, prefetch
        the one before it, and drop those whose backward is over (see the module's docstring)."""
        for j in [j for j in self.installed if self.index[j] >= self.index[k] + 2]:
            self._uninstall(j)
        self._install(k)
        self._copy(k - 1)

    def _before(self, k: int, module, args) -> None:
        if torch._C._current_graph_task_id() != -1:  # a checkpoint's recomputation, inside backward
            self._backward_reaches(k)
            return
        for j in [j for j in self.installed if j != k]:
            self._uninstall(j)  # left from the last backward
        self._install(k)
        self._copy(k + 1)

    def _after(self, k: int, module, args, output: torch.Tensor) -> None:
        if torch._C._current_graph_task_id() != -1:
            return  # recomputed: the unit's own backward comes next
        self._uninstall(k)
        if output.requires_grad:
            # before any of the unit's backward: an fp8 conv reads its module's codes there, and saves nothing that
            # would have made the checkpoint recompute (and so load) the unit first
            output.register_hook(functools.partial(self._backward_reaches, k))
