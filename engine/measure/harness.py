"""Device, versions, timing, peak memory and result rows: what `gesso bench` and `benchmarks/` both report.

GPU: triton.testing.do_bench (median of its 20/50/80% quantiles, L2 flushed between runs) and
torch.cuda.max_memory_allocated. CPU (smoke test only): median wall time of a few calls, no peak
memory. Every row names the device, versions, git revision and date; throughput comes from the
explicit FLOP or byte formula passed in by the benchmark, beside the device's datasheet ceiling.
The GPU session's quick stage uses `matmul_peak_tflops` (the bf16 rate measured on the card, its MFU
denominator) and `time_steps` (median seconds and peaks of any step function: the diffusers peer, a graph).
"""
import datetime
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the package folder: the repository root in a checkout
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # CPU matmuls in bf16 are emulated and slow

# Vendor datasheet peaks, not measurements: dense bf16 tensor-core TFLOP/s and HBM GB/s.
CEILINGS = {
    "H100 80GB HBM3": (989.4, 3350.0),  # H100 SXM5
    "H100 PCIe": (756.5, 2000.0),
    "H200": (989.4, 4800.0),
    "A100-SXM4-80GB": (312.0, 2039.0),
    "A100-SXM4-40GB": (312.0, 1555.0),
}


def on_gpu() -> bool:
    return ON_GPU


def device_name() -> str:
    if on_gpu():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}"


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")


def ceiling() -> tuple:
    """(TFLOP/s, GB/s) from the datasheet table, or (None, None) for an unlisted device or a CPU."""
    name = device_name()
    for key, peaks in CEILINGS.items():
        if key in name:
            return peaks
    return (None, None)


def results_dir() -> Path:
    """benchmarks/results in a checkout of the repository; ./benchmark-results where Gesso is installed from a wheel."""
    return ROOT / "benchmarks" / "results" if (ROOT / "benchmarks").is_dir() else Path.cwd() / "benchmark-results"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "benchmarks"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    import triton  # not at the top: importing it reads TRITON_INTERPRET, which the caller may still set

    return dict(device=device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, git=git_revision(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                timing="triton.testing.do_bench median" if on_gpu() else "CPU wall-clock median (smoke test)")


def measure(fn, cpu_reps: int = 2) -> tuple:
    """(milliseconds, peak bytes or None) of one call of fn."""
    if on_gpu():
        import triton.testing

        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8])[1]
        return ms, peak
    fn()
    times = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), None


def row(op: str, case: str, impl: str, dtype, ms: float, peak_bytes, flops=None, bytes_moved=None) -> dict:
    """One result: time, peak memory and throughput from the given formula, beside the ceiling."""
    tflops_peak, gbs_peak = ceiling()
    out = dict(op=op, case=case, impl=impl, dtype=str(dtype).removeprefix("torch."), ms=round(ms, 4), device=device_name(),
               peak_mib=None if peak_bytes is None else round(peak_bytes / 2**20, 1))
    if flops is not None:
        out.update(tflops=round(flops / ms / 1e9, 2), tflops_ceiling=tflops_peak)
    if bytes_moved is not None:
        out.update(gbs=round(bytes_moved / ms / 1e6, 1), gbs_ceiling=gbs_peak)
    return out


def matmul_peak_tflops(device: torch.device, n: int = 8192) -> float | None:
    """Measured dense bf16 matmul rate of this GPU (n x n x n, median of triton.testing.do_bench): the MFU
    denominator the GPU session uses, since a card's sustained rate sits below its datasheet's. None on a CPU."""
    if device.type != "cuda":
        return None
    import triton.testing

    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)  # random, not zeros: zeros run faster
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, quantiles=[0.5])
    ms = ms[0] if isinstance(ms, list) else ms
    del a, b
    return 2 * n**3 / ms / 1e9


def time_steps(step, steps: int, warmup: int, device: torch.device) -> tuple:
    """(median seconds, peak allocated GiB, peak reserved GiB) of `step()` over `steps` calls after `warmup`, each
    synchronised before and after; peaks over the timed calls only (None on a CPU)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type != "cuda":
        return statistics.median(times), None, None
    return (statistics.median(times), torch.cuda.max_memory_allocated(device) / 2**30,
            torch.cuda.max_memory_reserved(device) / 2**30)
