"""End-to-end LoRA training-step benchmark: seconds per step, images/s, MFU and peak memory on cached-latent
shapes, for the engine's kernels and for the PyTorch reference path in the same process.

The reference path is torch matmuls and `F.scaled_dot_product_attention` (kernels forced to `reference`,
attention through SDPA) with `torch.optim.AdamW`; the engine path is the dispatching kernels with AdamW8bit.
FLOPs are counted by torch's FlopCounterMode over one real step (forward, backward and any recomputation).
"""
import contextlib
import statistics
import time
from dataclasses import asdict, dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import models
from engine import lora
from kernels import attention as attention_ops
from kernels.adamw8bit import AdamW8bit
from kernels.dispatch import forced


@dataclass
class BenchRow:
    path: str  # "kernels" or "reference"
    model: str
    device: str
    resolution: int
    batch: int
    rank: int
    seconds_per_step: float  # median over the timed steps
    images_per_s: float
    tflop_per_step: float  # counted, forward + backward + recomputation
    mfu: float | None  # achieved FLOP/s over the device's dense bf16 peak; None without a known peak
    peak_allocated_gib: float | None
    peak_reserved_gib: float | None


def _step(unet, opt, x, t, context, y):
    loss = F.mse_loss(unet(x, t, context, y).float(), torch.randn_like(x, dtype=torch.float32))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_path(path: str, model: str, resolution: int, batch: int, rank: int, steps: int, warmup: int,
             device: torch.device, dtype: torch.dtype, gradient_checkpointing: bool, peak_tflops: float | None) -> BenchRow:
    """One row: a fresh random-weight model with LoRA of `rank` on kohya's default targets, trained `steps` times."""
    cfg = models.configs.get(model)
    sd = models.build(cfg, seed=0, device=device, dtype=dtype)
    unet = sd.unet.requires_grad_(False)
    del sd  # the VAE and text encoders are not part of a cached-latent step
    unet.gradient_checkpointing = gradient_checkpointing
    network = lora.inject(unet, lora.attention_targets(unet), "lora_unet_", rank, rank)
    params = network.parameters()
    opt = AdamW8bit(params, lr=1e-4) if path == "kernels" else torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    h = resolution // 8
    x = torch.randn(batch, cfg.unet.in_channels, h, h, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    context = torch.randn(batch, 77, cfg.unet.context_dim, generator=g).to(device, dtype)
    y = None if cfg.unet.adm_in_channels is None else torch.randn(batch, cfg.unet.adm_in_channels, generator=g).to(device, dtype)
    mode = "auto" if path == "kernels" else "reference"
    sdpa = mock.patch.object(attention_ops, "attention_ref", lambda q, k, v, upcast=True: F.scaled_dot_product_attention(q, k, v))
    with forced(mode), (sdpa if path == "reference" else contextlib.nullcontext()):
        for _ in range(warmup):
            _step(unet, opt, x, t, context, y)
        with FlopCounterMode(display=False) as counter:
            _step(unet, opt, x, t, context, y)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            _step(unet, opt, x, t, context, y)
            _sync(device)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tflop = counter.get_total_flops() / 1e12
    cuda = device.type == "cuda"
    return BenchRow(path, model, str(torch.cuda.get_device_name(device) if cuda else "cpu"), resolution, batch, rank,
                    seconds, batch / seconds, tflop, tflop / seconds / peak_tflops if peak_tflops else None,
                    torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                    torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None)


def describe(rows: list[BenchRow]) -> str:
    lines = [f"{'path':<10} {'model':<10} {'res':>5} {'bs':>3} {'rank':>4} {'s/step':>9} {'img/s':>7} {'TFLOP':>8} {'MFU':>6} {'peak GiB':>9}"]
    for r in rows:
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "-"
        peak = f"{r.peak_allocated_gib:.2f}" if r.peak_allocated_gib is not None else "-"
        lines.append(f"{r.path:<10} {r.model:<10} {r.resolution:>5} {r.batch:>3} {r.rank:>4} {r.seconds_per_step:>9.4f} "
                     f"{r.images_per_s:>7.2f} {r.tflop_per_step:>8.4f} {mfu:>6} {peak:>9}")
    if len(rows) == 2:
        lines.append(f"reference / kernels time: {rows[1].seconds_per_step / rows[0].seconds_per_step:.2f}x")
    return "\n".join(lines)


def as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
