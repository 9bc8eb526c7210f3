"""One LoRA training step end to end (forward, backward, optimizer step) on cached-latent shapes: the engine's
kernels with AdamW8bit vs the reference path (torch matmuls, scaled_dot_product_attention, torch.optim.AdamW).

GPU: the full SDXL UNet (random weights) at 1024x1024, batch 1, LoRA rank 16 on kohya's default targets, bf16
base with gradient checkpointing. CPU: tiny-sdxl at 64 px, rank 4, the reference path only (a smoke test).
TFLOP/s comes from the step's FLOPs counted once on the reference path, the forward recomputed by
checkpointing included (FlopCounterMode cannot see Triton kernels); `python cli.py bench --matrix` has the
issue's full grid, memory modes and MFU.
"""
import pytest
import torch

from benchmarks import harness
from benchmarks.harness import DEVICE, DTYPE, ON_GPU, gpu_only
from gesso.engine.measure import bench

CASE = bench.Case("sdxl", 1024, 1, 16) if ON_GPU else bench.Case("tiny-sdxl", 64, 1, 4)
PATHS = {"gesso-kernels": "kernels", "torch-reference": "reference"}


@pytest.fixture(scope="module")
def model():
    """(UNet with LoRA, the network, one batch, FLOPs of one step), shared by both impls and freed afterwards."""
    device = torch.device(DEVICE)
    threads = torch.get_num_threads()
    if not ON_GPU:  # a tiny model on shared CPU cores: one thread, never stalled in OpenMP waits (tests/conftest.py)
        torch.set_num_threads(1)
    bench.release(device)
    unet, network = bench.build(CASE, device, DTYPE)
    batch = bench.make_batch(CASE, 0, device, DTYPE)
    with bench.kernel_path("reference"):
        step_tflop, _ = bench.count_flops(unet, bench.optimizer("reference", network, device), batch)
    yield unet, network, batch, step_tflop * 1e12
    del unet, network, batch
    bench.release(device)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", [gpu_only("gesso-kernels"), "torch-reference"])
def bench_train_step(benchmark, model, impl):
    unet, network, batch, flops = model
    path = PATHS[impl]
    opt = bench.optimizer(path, network, torch.device(DEVICE))

    def step():
        with bench.kernel_path(path):
            bench.step(unet, opt, batch)

    case = f"{CASE.model}-{CASE.resolution}px-b{CASE.batch}-r{CASE.rank}-ckpt"
    harness.run(benchmark, "train_step", case, impl, step, flops=flops)
