"""End-to-end LoRA training-step benchmark: seconds per step, images/s, MFU and peak memory on cached-latent
shapes, for the engine's kernels and for the PyTorch reference path in the same process; and a loss check
that trains both paths from the same start on the same batches and compares their loss curves.

The reference path is the kernels forced to `reference` (torch matmuls, `F.scaled_dot_product_attention`)
with `torch.optim.AdamW`; the engine path is the dispatching kernels with AdamW8bit. Both paths of a case
train one model (random weights, real shapes), built on the device itself and freed before the next case.

FLOPs: FlopCounterMode sees torch ops only, not Triton kernels, so it would undercount the engine path.
The step is therefore counted once, on the reference path of the same case (forward, backward, and the
forward again inside checkpointed blocks when gradient checkpointing is on), and that figure is the
model-FLOP count of both rows' MFU. With checkpointing the recomputed forward is counted as work done, so
the MFU of those rows is hardware-FLOP utilisation in the strict sense; each row says whether it was on.
`unet_forward_flops` is the same count written out from the architecture; a test holds the counter to it.
"""
import gc
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from gesso import models
from gesso.engine import diffusion
from gesso.engine.config.sections import Config, NetworkSection, TrainSection
from gesso.engine.lora import network as lora
from gesso.engine.memory.network_setup import prepare_unet
from gesso.kernels.adamw8bit import AdamW8bit
from gesso.kernels.dispatch import forced
from gesso.models.configs import UNetConfig
from gesso.models.unet import UNet

TOKENS = 77  # one prompt chunk of cached text embeddings
ALPHAS_CUMPROD = diffusion.scaled_linear_alphas_cumprod()


def _cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _cpu_sdpa_backward_flops(dout_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(dout_shape, q_shape, k_shape, v_shape)


# torch registers FLOP formulas for the GPU attention ops only; the CPU fused op computes the same products
CPU_SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops}


@dataclass(frozen=True)
class Case:
    model: str
    resolution: int
    batch: int
    rank: int
    fp8_base: bool = False  # frozen UNet weights stored in fp8 e4m3 (engine.memory.fp8.quantize_frozen)
    gradient_checkpointing: bool = True
    blocks_to_swap: int = 0  # engine.memory.blockswap: the N largest blocks' frozen weights wait in pinned host memory


@dataclass
class BenchRow:
    path: str  # "kernels" or "reference"
    model: str
    device: str
    resolution: int
    batch: int
    rank: int
    base_weights: str  # dtype the frozen UNet weights are stored in: bfloat16, float32 or fp8-e4m3
    gradient_checkpointing: bool
    optimizer: str
    seconds_per_step: float  # median over the timed steps
    images_per_s: float
    tflop_per_step: float  # counted on the reference path: forward + backward + recomputation
    forward_tflop: float  # one forward, counted on the reference path
    mfu: float | None  # tflop_per_step / seconds over the device's dense bf16 peak; None without a known peak
    peak_allocated_gib: float | None  # over the timed steps, weights included; None on the CPU
    peak_reserved_gib: float | None
    reference_over_kernels: float | None = None  # reference seconds / kernels seconds, on the kernels row
    blocks_to_swap: int = 0


@dataclass
class LossCheck:
    model: str
    device: str
    resolution: int
    batch: int
    rank: int
    base_weights: str
    gradient_checkpointing: bool
    lr: float
    tolerance: float  # largest relative difference of the loss allowed at any step
    kernels: list[float]  # loss per step, engine kernels
    reference: list[float]  # loss per step, reference path: same start, same batches, same optimizer
    no_update: list[float]  # loss per step of the initial LoRA, never updated: what training changed
    max_rel_diff: float
    mean_rel_diff: float
    training_max_rel_change: float  # max |reference - no_update| / |no_update|
    update_rel_diff: float  # |LoRA_kernels - LoRA_reference| / |LoRA_reference - LoRA_init| after the last step
    losses_agree: bool  # max_rel_diff <= tolerance
    updates_agree: bool  # update_rel_diff <= UPDATE_TOLERANCE
    passed: bool  # both
    sensitive: bool  # training moved the loss by more than the tolerance: the loss curves alone could show a broken backward


def matrix(on_gpu: bool) -> list[Case]:
    """The issue's grid with bf16 + checkpointing, then the memory modes at the first size: no checkpointing, fp8.

    On the CPU the same layout shrinks to tiny-sdxl at 64/32 px, batch 1/2, rank 4/8 (a smoke test)."""
    if on_gpu:
        model, resolutions, batches, ranks = "sdxl", (1024, 512), (1, 4), (16, 64)
    else:
        model, resolutions, batches, ranks = "tiny-sdxl", (64, 32), (1, 2), (4, 8)
    grid = [Case(model, res, b, r) for res in resolutions for b in batches for r in ranks]
    first = (model, resolutions[0], batches[0], ranks[0])
    return grid + [Case(*first, gradient_checkpointing=False), Case(*first, fp8_base=True)]


def unet_forward_flops(u: UNetConfig, resolution: int, batch: int, tokens: int = TOKENS) -> int:
    """FLOPs of one UNet forward on (batch, C, resolution/8, resolution/8) latents: 2 per multiply-add of every
    convolution, linear and attention product (norms, activations and resampling are not counted)."""
    emb = 4 * u.model_channels

    def conv(cin, cout, k, side):
        return batch * side * side * cin * cout * k * k

    def res_block(cin, cout, side):
        skip = conv(cin, cout, 1, side) if cin != cout else 0
        return conv(cin, cout, 3, side) + batch * emb * cout + conv(cout, cout, 3, side) + skip

    def transformer(ch, depth, side):
        heads, dim_head = u.heads_and_dim(ch)
        inner, n, t = heads * dim_head, batch * side * side, side * side
        self_attn = 4 * n * inner * inner + 2 * batch * heads * t * t * dim_head  # q k v out; q k^T and p v
        cross_attn = 2 * n * inner * inner + 2 * batch * tokens * u.context_dim * inner + 2 * batch * heads * t * tokens * dim_head
        feed_forward = n * inner * 8 * inner + n * 4 * inner * inner  # GEGLU to 2 x 4 inner, then back
        return 2 * n * ch * inner + depth * (self_attn + cross_attn + feed_forward)  # proj_in, proj_out

    mc, side = u.model_channels, resolution // 8
    mac = batch * (mc * emb + emb * emb)
    if u.adm_in_channels is not None:
        mac += batch * (u.adm_in_channels * emb + emb * emb)
    mac += conv(u.in_channels, mc, 3, side)
    ch, skips = mc, [mc]
    for level, mult in enumerate(u.channel_mult):
        for _ in range(u.num_res_blocks):
            mac += res_block(ch, mult * mc, side)
            ch = mult * mc
            mac += transformer(ch, u.transformer_depth[level], side) if u.transformer_depth[level] else 0
            skips.append(ch)
        if level != len(u.channel_mult) - 1:
            side = (side + 1) // 2
            mac += conv(ch, ch, 3, side)
            skips.append(ch)
    mac += 2 * res_block(ch, ch, side) + transformer(ch, u.transformer_depth_middle, side)
    for level, mult in reversed(list(enumerate(u.channel_mult))):
        for i in range(u.num_res_blocks + 1):
            mac += res_block(ch + skips.pop(), mult * mc, side)
            ch = mult * mc
            mac += transformer(ch, u.transformer_depth[level], side) if u.transformer_depth[level] else 0
            if level and i == u.num_res_blocks:
                side *= 2
                mac += conv(ch, ch, 3, side)
    return 2 * (mac + conv(mc, u.out_channels, 3, side))


def release(device: torch.device) -> None:
    """Free what the previous case or path left, so one row's peak never includes another's memory (GPU only:
    no peak is measured on the CPU, where a collection costs more than a tiny step)."""
    if device.type == "cuda":
        gc.collect()  # LoRA modules and autograd graphs hold reference cycles
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build(case: Case, device: torch.device, dtype: torch.dtype) -> tuple[UNet, lora.LoRANetwork]:
    """Random UNet, frozen base in `dtype`, with LoRA of `rank` (alpha = rank) set up as a training run sets it up
    (engine/memory/network_setup.py: kohya's targets, fp8 bases, checkpointing, block swap), the same for a seed."""
    run = Config(network=NetworkSection(rank=case.rank, alpha=float(case.rank)), train=TrainSection(
        fp8_base=case.fp8_base, gradient_checkpointing=case.gradient_checkpointing, blocks_to_swap=case.blocks_to_swap))
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(0)
        with torch.device(device):  # on the device itself: the full SDXL UNet takes seconds there, minutes on the host CPU
            unet = UNet(models.configs.get(case.model).unet).to(dtype).requires_grad_(False)
        network, _ = prepare_unet(unet, run, device)  # LoRA made where its base weight is
    return unet, network


@dataclass
class Batch:
    noisy: torch.Tensor  # (B, 4, H/8, W/8)
    t: torch.Tensor  # (B,)
    context: torch.Tensor  # (B, 77, context_dim)
    y: torch.Tensor | None  # (B, adm_in_channels)
    noise: torch.Tensor


def make_batch(case: Case, seed: int, device: torch.device, dtype: torch.dtype) -> Batch:
    """Cached latents and text embeddings, timesteps and noise drawn from a CPU generator: the same on every device."""
    u = models.configs.get(case.model).unet
    g = torch.Generator().manual_seed(seed)
    side = case.resolution // 8
    x0 = torch.randn(case.batch, u.in_channels, side, side, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, len(ALPHAS_CUMPROD), (case.batch,), generator=g)
    context = torch.randn(case.batch, TOKENS, u.context_dim, generator=g)
    y = None if u.adm_in_channels is None else torch.randn(case.batch, u.adm_in_channels, generator=g).to(device, dtype)
    return Batch(diffusion.add_noise(x0, noise, t, ALPHAS_CUMPROD).to(device, dtype), t.to(device),
                 context.to(device, dtype), y, noise.to(device, dtype))


def step(unet: UNet, opt: torch.optim.Optimizer, b: Batch) -> torch.Tensor:
    loss = diffusion.epsilon_loss(unet(b.noisy, b.t, b.context, b.y), b.noise)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def kernel_path(path: str) -> forced:
    """Kernel dispatch for one path: `kernels` = auto (Triton on a capable GPU), `reference` = torch ops, SDPA attention."""
    return forced("auto" if path == "kernels" else "reference")


def count_flops(unet: UNet, opt: torch.optim.Optimizer, b: Batch) -> tuple[float, float]:
    """(step TFLOP, forward TFLOP) counted on whatever path is active (call it on the reference path)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        step(unet, opt, b)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as forward:
        unet(b.noisy, b.t, b.context, b.y)
    return counter.get_total_flops() / 1e12, forward.get_total_flops() / 1e12


def base_weights(case: Case, dtype: torch.dtype) -> str:
    return "fp8-e4m3" if case.fp8_base else str(dtype).removeprefix("torch.")


def optimizer(path: str, network: lora.LoRANetwork, device: torch.device) -> torch.optim.Optimizer:
    params = network.parameters()
    return AdamW8bit(params, lr=1e-4) if path == "kernels" else torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")


def time_path(path, unet, network, b, steps, warmup, device, count) -> tuple:
    """(median seconds, peak allocated GiB, peak reserved GiB, counted FLOPs or None) of one path."""
    opt = optimizer(path, network, device)
    with kernel_path(path):
        flops = count_flops(unet, opt, b) if count else None
        for _ in range(warmup):
            step(unet, opt, b)
        release(device)  # peaks from here on: the steady-state step, weights and optimizer state included
        times = []
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            step(unet, opt, b)
            _sync(device)
            times.append(time.perf_counter() - start)
    peaks = (None, None)
    if device.type == "cuda":
        peaks = (torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30)
    del opt  # its state leaves before the other path builds its own
    release(device)
    return statistics.median(times), *peaks, flops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, steps: int, warmup: int, device: torch.device, dtype: torch.dtype,
             peak_tflops: float | None) -> list[BenchRow]:
    """[kernels row, reference row] of one case on one freshly built model; FLOPs counted on the reference path."""
    release(device)
    unet, network = build(case, device, dtype)
    b = make_batch(case, 0, device, dtype)
    ref = time_path("reference", unet, network, b, steps, warmup, device, count=True)
    ker = time_path("kernels", unet, network, b, steps, warmup, device, count=False)
    del unet, network, b
    release(device)
    tflop, forward_tflop = ref[3]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for path, (seconds, allocated, reserved, _) in (("kernels", ker), ("reference", ref)):
        rows.append(BenchRow(path, case.model, name, case.resolution, case.batch, case.rank, base_weights(case, dtype),
                             case.gradient_checkpointing, "AdamW8bit" if path == "kernels" else "torch.optim.AdamW",
                             seconds, case.batch / seconds, tflop, forward_tflop,
                             tflop / seconds / peak_tflops if peak_tflops else None, allocated, reserved))
    rows[0].reference_over_kernels = ref[0] / ker[0]
    for row in rows:
        row.blocks_to_swap = case.blocks_to_swap
    return rows


def loss_tolerance(dtype: torch.dtype) -> float:
    # bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3). The paths round in different orders through ~70
    # transformer blocks and the differences ride along the Adam trajectory: 2e-2 is 5 roundoffs. Measured on
    # tiny-sdxl in bf16 on the CPU, math attention against SDPA (30 steps, lr 1e-4): at most 1.2e-3 apart per step.
    # fp32 (CPU): both paths run the same reference kernels; only summation order may differ, far below 1e-4.
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4


# A random model barely learns in 50 steps (tiny-sdxl, bf16, lr 1e-4: the loss moved 9e-4), so equal loss curves
# vouch for the forward, not the backward. The LoRA weights do: a LoRA that does not train, or trains in another
# direction, is 1 or more away from the reference's update; bf16 rounding (the same measurement) left 0.09.
UPDATE_TOLERANCE = 0.5


def relative_differences(a: list[float], b: list[float]) -> list[float]:
    """|a - b| / |b| per step."""
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True)]


def _curve(unet, params, init, path, case, steps, lr, device, dtype) -> tuple[list[float], torch.Tensor]:
    """Loss per step of `path` trained from `init` with torch.optim.AdamW(lr), and the LoRA weights it ends with."""
    with torch.no_grad():
        for p, p0 in zip(params, init):
            p.copy_(p0)
    opt = torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")
    with kernel_path(path):
        losses = [step(unet, opt, make_batch(case, i, device, dtype)).item() for i in range(steps)]
    del opt
    release(device)
    return losses, torch.cat([p.detach().flatten() for p in params])


def loss_check(case: Case, steps: int, lr: float, device: torch.device, dtype: torch.dtype) -> LossCheck:
    """Train `steps` steps on the kernels path and again on the reference path from the same LoRA init, on the same
    seeded batches, both with torch.optim.AdamW(lr), so only the kernels differ; compare losses and LoRA updates."""
    release(device)
    unet, network = build(case, device, dtype)
    params = network.parameters()
    init = [p.detach().clone() for p in params]
    kernels, lora_k = _curve(unet, params, init, "kernels", case, steps, lr, device, dtype)
    reference, lora_r = _curve(unet, params, init, "reference", case, steps, lr, device, dtype)
    lora_0 = torch.cat([p.flatten() for p in init])
    update_diff = ((lora_k - lora_r).norm() / (lora_r - lora_0).norm().clamp_min(1e-30)).item()
    no_update = []
    with torch.no_grad(), kernel_path("reference"):
        for p, p0 in zip(params, init):
            p.copy_(p0)
        for i in range(steps):
            b = make_batch(case, i, device, dtype)
            no_update.append(diffusion.epsilon_loss(unet(b.noisy, b.t, b.context, b.y), b.noise).item())
    del unet, network, params, init, lora_k, lora_r, lora_0
    release(device)
    diffs = relative_differences(kernels, reference)
    moved = max(relative_differences(reference, no_update))
    tol = loss_tolerance(dtype)
    losses_agree, updates_agree = max(diffs) <= tol, update_diff <= UPDATE_TOLERANCE
    return LossCheck(case.model, str(device), case.resolution, case.batch, case.rank, base_weights(case, dtype),
                     case.gradient_checkpointing, lr, tol, kernels, reference, no_update, max(diffs), statistics.mean(diffs),
                     moved, update_diff, losses_agree, updates_agree, losses_agree and updates_agree, moved > tol)


def describe(rows: list[BenchRow]) -> str:
    lines = [f"{'path':<10} {'model':<10} {'res':>5} {'bs':>3} {'rank':>4} {'base':>9} {'ckpt':>4} {'s/step':>9} {'img/s':>7} "
             f"{'TFLOP':>8} {'MFU':>6} {'alloc GiB':>9} {'resv GiB':>8} {'ref/kern':>8} {'swap':>4}"]
    for r in rows:
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "-"
        alloc = f"{r.peak_allocated_gib:.2f}" if r.peak_allocated_gib is not None else "-"
        resv = f"{r.peak_reserved_gib:.2f}" if r.peak_reserved_gib is not None else "-"
        ratio = f"{r.reference_over_kernels:.2f}x" if r.reference_over_kernels is not None else ""
        lines.append(f"{r.path:<10} {r.model:<10} {r.resolution:>5} {r.batch:>3} {r.rank:>4} {r.base_weights:>9} "
                     f"{'yes' if r.gradient_checkpointing else 'no':>4} {r.seconds_per_step:>9.4f} {r.images_per_s:>7.2f} "
                     f"{r.tflop_per_step:>8.3g} {mfu:>6} {alloc:>9} {resv:>8} {ratio:>8} {r.blocks_to_swap:>4}")
    lines.append("ref/kern: reference / kernels time per step (above 1: the kernels are faster); "
                 "TFLOP counted on the reference path, used for both rows' MFU")
    return "\n".join(lines)


def describe_loss(c: LossCheck) -> str:
    power = "" if c.sensitive else " (less than the tolerance: the loss curves alone cannot show a broken backward)"
    return (f"loss check {c.model} {c.resolution}px b{c.batch} r{c.rank} {c.base_weights} "
            f"ckpt={'yes' if c.gradient_checkpointing else 'no'}, {len(c.reference)} steps, lr {c.lr:g}: "
            f"loss max rel diff {c.max_rel_diff:.2e}, mean {c.mean_rel_diff:.2e} (tolerance {c.tolerance:g}); "
            f"LoRA update rel diff {c.update_rel_diff:.2e} (tolerance {UPDATE_TOLERANCE:g}) -> {'pass' if c.passed else 'FAIL'}; "
            f"training changed the loss by up to {c.training_max_rel_change:.2e}{power}")


def driver_version() -> str | None:
    """The NVIDIA driver version nvidia-smi reports, or None (no GPU, no nvidia-smi)."""
    if not torch.cuda.is_available():
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def as_dicts(items: list) -> list[dict]:
    return [asdict(item) for item in items]
