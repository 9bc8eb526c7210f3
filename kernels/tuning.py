"""Tile configurations for the Triton kernels: autotuned on a GPU, one small fixed tile under the interpreter.

On a GPU each kernel is wrapped in `triton.autotune` keyed on its problem sizes (the tuner adds the tensors'
dtypes to the key), so the first call at a new shape times the configurations that fit it and keeps the
fastest. The lists hold the tiles that feed Hopper's and Ada's tensor cores (128x128 and 128x256, 3-4 stages,
8 warps) and smaller ones for short rows (cross-attention over 77 tokens) and wide heads (SD 1.5's 40/80/160,
padded to 64/128/256). A configuration larger than the problem is pruned before timing, so tiny shapes (the
tests) compile one or two tiles, not all of them; one that runs out of shared memory is skipped by the tuner.
Under TRITON_INTERPRET=1 every kernel gets one small fixed configuration: nothing to time, and the
interpreter's cost grows with the tile. Tuning results are cached on disk (`cache_results`) so the GPU
session's later processes do not re-time what an earlier one measured.
"""
import inspect

import triton
import triton.testing


def interpreted(fn) -> bool:
    """True when `triton.jit` built an interpreted function (TRITON_INTERPRET=1 was set before triton.language)."""
    return type(fn).__name__ == "InterpretedFunction"


def config(num_warps: int, num_stages: int, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def _bench(kernel_call, quantiles):
    # shorter than the default 25/100 ms: about 40 keys a SDXL step, each timing up to six tiles, at first call
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


# do_bench (triton >= 3.1) and cache_results (>= 3.3) are in 3.6, on the GPU machine, and 3.9; an older triton
# tunes with its own timing and no disk cache rather than failing at import
OPTIONS = {name: value for name, value in (("do_bench", _bench), ("cache_results", True))
           if name in inspect.signature(triton.autotune).parameters}


def fits(configs: list, sizes: dict) -> list:
    """Configurations whose tile dims (BLOCK_* in `sizes`) do not exceed the problem's; the smallest tile if none do."""
    kept = [c for c in configs if all(c.kwargs[name] <= size for name, size in sizes.items())]
    if kept:
        return kept
    return [min(configs, key=lambda c: (sum(c.kwargs[n] for n in sizes), c.num_warps, c.num_stages))]


def autotuned(configs: list, interpreter_config: triton.Config, key: list, prune=None):
    """Decorator over a `triton.jit` kernel: autotune over `configs` on a GPU, `interpreter_config` alone when interpreted.

    prune(configs, named_args, **kwargs) -> configs narrows the list for one call (Triton's early_config_prune).
    """

    def wrap(fn):
        if interpreted(fn):
            return triton.autotune([interpreter_config], key=key)(fn)
        pruning = {"early_config_prune": prune} if prune else None
        return triton.autotune(configs, key=key, prune_configs_by=pruning, **OPTIONS)(fn)

    return wrap
