"""pytest glue for the kernel benchmarks: GPU-only parameters and pytest-benchmark rows.

The device, versions, timing and result rows come from `gesso.engine.measure.harness`, which `gesso bench`
uses too; this file only adds what needs pytest.
"""
import pytest
import torch

from gesso.engine.measure.harness import DEVICE, DTYPE, ON_GPU, device_slug, environment, measure, on_gpu, row

__all__ = ["DEVICE", "DTYPE", "ON_GPU", "device_slug", "environment", "gpu_only", "on_gpu", "run"]


def gpu_only(impl: str):
    """A Triton (or CUDA-only) impl is skipped on CPU: the interpreter would time Python, not a kernel."""
    return pytest.param(impl, marks=pytest.mark.skipif(not ON_GPU, reason="GPU impl; the CPU smoke test runs references"))


def run(benchmark, op: str, case: str, impl: str, fn, flops=None, bytes_moved=None, dtype=DTYPE) -> dict:
    """Time fn with the harness, put the row in pytest-benchmark's extra_info, let it time fn too."""
    ms, peak = measure(fn)
    result = row(op, case, impl, dtype, ms, peak, flops, bytes_moved)
    benchmark.extra_info.update(result)
    benchmark.extra_info["env"] = environment()

    def synced():
        fn()
        if on_gpu():
            torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20 if on_gpu() else 1, iterations=1, warmup_rounds=1 if on_gpu() else 0)
    return result
