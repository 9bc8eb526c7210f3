"""`train.memory = "auto"`: the fastest memory mode whose predicted peak fits the device's free memory.

Modes from fastest to leanest: plain (half-precision bases), gradient checkpointing, fp8 bases with
checkpointing, then block swap on top of that with the smallest number of blocks that fits (each swapped
block's weights cross the bus twice per step). Each candidate is predicted on the meta device
(engine/memory/memtrace.py); the first that fits with the margin below is chosen. Auto trains in bf16
(fp16 when mixed_precision says fp16), whatever mixed_precision says otherwise.
"""
import os

import torch

from gesso.engine.config.sections import Config
from gesso.engine.lora import names
from gesso.engine.memory import memtrace
from gesso.engine.memory.blockswap import frozen_bytes
from gesso.engine.memory.network_setup import AMP_DTYPES, prepare_unet
from gesso.errors import ConfigError

GIB = 2**30
# The prediction leaves out cuBLAS and kernel workspaces and the caching allocator's rounding and fragmentation
# (memtrace's docstring): 10% of the peak plus 0.3 GiB is kept free for them.
MARGIN_FACTOR = 1.10
MARGIN_GIB = 0.3


def fits(p: memtrace.MemoryPrediction, free_gib: float) -> bool:
    return p.peak_gib * MARGIN_FACTOR + MARGIN_GIB <= free_gib


def free_gib(device: torch.device) -> float:
    """Free memory where training will run: the GPU's (torch.cuda.mem_get_info), else the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / GIB
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB


def _unit_bytes(cfg: Config) -> list[int]:
    """Frozen bytes of each block as training stores it (fp8 bases when cfg says so), largest first."""
    unet = names.meta_unet(memtrace.model_config(cfg).unet).requires_grad_(False)
    unet.to(AMP_DTYPES.get(cfg.train.mixed_precision, torch.float32))
    prepare_unet(unet, cfg, torch.device("meta"))  # a mode without block swap: every block's weights still in place
    return sorted((frozen_bytes(u) for u in unet.units()), reverse=True)


def _smallest_swap(cfg: Config, base: memtrace.MemoryPrediction, free: float, predict) -> tuple[Config, memtrace.MemoryPrediction] | None:
    """The fewest blocks to swap (over `cfg`'s mode, fp8 + checkpointing) that fit, found with few predictions:
    swapping N blocks saves at most their bytes (a lower bound on N) and costs at most the two largest as buffers
    (an upper bound, checked); a binary search between the two bounds settles it."""
    sizes = _unit_bytes(cfg)
    need = (base.peak_gib - (free - MARGIN_GIB) / MARGIN_FACTOR) * GIB  # bytes to take off the peak
    saved = [sum(sizes[:n]) for n in range(len(sizes) + 1)]
    low = next((n for n in range(1, len(sizes) + 1) if saved[n] >= need), len(sizes))
    high = next((n for n in range(low, len(sizes) + 1) if saved[n] - sizes[0] - sizes[1] >= need), len(sizes))

    def search(low: int, high: int):
        best = None
        while low <= high:
            n = (low + high) // 2
            c = memtrace.with_mode(cfg, True, True, n)
            p = predict(c)
            if fits(p, free):
                best, high = (c, p), n - 1
            else:
                low = n + 1
        return best

    return search(low, high) or search(high + 1, len(sizes))


def plan(cfg: Config, free: float, predict=None) -> tuple[Config, memtrace.MemoryPrediction]:
    """`cfg` in the fastest mode that fits `free` GiB, and its prediction (by `predict`, memtrace's by default);
    a ConfigError when none does."""
    predict = predict or memtrace.predict
    for fp8_base, checkpointing in ((False, False), (False, True), (True, True)):
        c = memtrace.with_mode(cfg, fp8_base, checkpointing)
        p = predict(c)
        if fits(p, free):
            return c, p
    found = _smallest_swap(c, p, free, predict)
    if found is None:
        every = predict(memtrace.with_mode(cfg, True, True, len(_unit_bytes(c))))
        raise ConfigError(f"train.memory = auto: no mode fits {free:.2f} GiB free; the leanest, {every.mode}, "
                          f"predicts {every.peak_gib:.2f} GiB (+{(MARGIN_FACTOR - 1):.0%} + {MARGIN_GIB} GiB margin)")
    return found


def describe(p: memtrace.MemoryPrediction, free: float) -> str:
    return f"train.memory = auto: {p.mode}, predicted peak {p.peak_gib:.2f} GiB of {free:.2f} GiB free"
