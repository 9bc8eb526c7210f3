"""Tile configurations for the Triton kernels: autotuned on a GPU, one small fixed tile under the interpreter.

On a GPU each kernel is wrapped in `triton.autotune` keyed on its problem sizes (the tuner adds the tensors'
dtypes to the key), so the first call at a new shape times the configurations that fit it and keeps the
fastest. The lists hold the tiles that feed Hopper's and Ada's tensor cores (128x128 and 128x256, 3-4 stages,
8 warps) and smaller ones for short rows (cross-attention over 77 tokens) and wide heads (SD 1.5's 40/80/160,
padded to 64/128/256). Before anything is compiled, a configuration larger than the problem is pruned, so tiny
shapes (the tests) compile one or two tiles, not all of them, and so is one whose predicted shared memory exceeds
the device's per-block limit (`shared_memory_per_block_optin`: 99 KiB on RTX 30xx/40xx/50xx, A10, L4, L40; 163 KiB
on A100; 227 KiB on H100/H200), which Triton would compile only to throw away. The prediction is each kernel's
tile bytes times its pipeline buffers (`buffers`); benchmarks/compile_targets.py checks it against the compiler's
own figure on every target. Under TRITON_INTERPRET=1 every kernel gets one small fixed configuration: nothing to time, and the
interpreter's cost grows with the tile. Tuning results are cached on disk (`cache_results`) so the GPU
session's later processes do not re-time what an earlier one measured.
"""
import inspect

import triton
import triton.testing

from gesso.kernels import device


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


def buffers(arch: int, stages: int, dot_rows: int, num_warps: int, ieee: bool) -> int:
    """Shared-memory copies of each tile a pipelined loop loads: `num_stages` on Hopper's wgmma path (sm_90, a tensor-
    core dot of 64 rows or more over whole warp groups), `num_stages - 1` for cp.async elsewhere (Ampere, Ada, consumer
    Blackwell, and fp32 `ieee` dots, which run on the FMA units)."""
    return stages if arch == 90 and not ieee and dot_rows >= 64 and num_warps % 4 == 0 else stages - 1


def describe(c: triton.Config) -> str:
    """"128x256x64 s3 w8": the tile dims in the order the config lists them, stages, warps."""
    return f"{'x'.join(str(v) for v in c.kwargs.values())} s{c.num_stages} w{c.num_warps}"


class DevicePruned:
    """Triton's early_config_prune for one kernel, run before anything is compiled: the tiles that fit the call's
    shape (`shape(configs, named_args, **kwargs)`), then those whose predicted shared memory
    (`shared(config, named_args, kwargs, arch)`, bytes) fits the device's per-block opt-in limit."""

    def __init__(self, shape, shared):
        self.shape, self.shared = shape, shared

    def __call__(self, configs: list, named_args: dict, **kwargs) -> list:
        shaped = self.shape(configs, named_args, **kwargs)
        where = next(v.device for v in named_args.values() if hasattr(v, "device"))
        gpu = device.gpu(where)
        return self.fitting(shaped, named_args, kwargs, gpu.arch, gpu.shared_memory)

    def refusal(self, config: triton.Config, named_args: dict, kwargs: dict, gpu: device.GPU) -> str | None:
        """Why `gpu` cannot hold `config` for this call (its predicted shared memory is over the limit), or None."""
        need = self.shared(config, named_args, kwargs, gpu.arch)
        if need <= gpu.shared_memory:
            return None
        return f"{describe(config)} needs about {need} B of shared memory; {gpu.name} has {gpu.shared_memory} B per block"

    def fitting(self, configs: list, named_args: dict, kwargs: dict, arch: int, limit: int) -> list:
        """The configurations that fit `limit` bytes on sm_`arch`; where none does, the smallest alone (its launch
        raises OutOfResources, which kernels/fallback.py answers with the reference)."""
        need = {id(c): self.shared(c, named_args, kwargs, arch) for c in configs}
        return [c for c in configs if need[id(c)] <= limit] or [min(configs, key=lambda c: need[id(c)])]


def autotuned(configs: list, interpreter_config: triton.Config, key: list, prune: DevicePruned):
    """Decorator over a `triton.jit` kernel: autotune over `configs` on a GPU, `interpreter_config` alone when interpreted.

    prune narrows the list for one call before Triton compiles any (its early_config_prune).
    """

    def wrap(fn):
        if interpreted(fn):
            return triton.autotune([interpreter_config], key=key)(fn)
        return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune}, **OPTIONS)(fn)

    return wrap
