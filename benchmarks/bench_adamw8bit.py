"""One optimizer step over the LoRA tensors of SDXL's UNet: 8-bit AdamW kernel vs fused fp32 AdamW."""
import pytest
import torch

from benchmarks import harness
from benchmarks.harness import DEVICE, ON_GPU, gpu_only
from gesso.kernels.adamw8bit import AdamW8bit


def sdxl_lora_shapes(rank: int, scale: int = 1) -> list:
    """down (r, in) and up (out, r) for the 722 default kohya targets of SDXL's UNet, widths divided by scale.

    70 transformer blocks (10 at 640 channels, 60 at 1280), each attn1 q/k/v/out, attn2 q/out (c -> c),
    attn2 k/v (2048 -> c), ff.net.0.proj (c -> 8c), ff.net.2 (4c -> c); 11 transformers' proj_in/out.
    """
    shapes = []
    for c, blocks, transformers in ((640 // scale, 10, 5), (1280 // scale, 60, 6)):
        per_block = [(c, c)] * 6 + [(2048 // scale, c)] * 2 + [(c, 8 * c), (4 * c, c)]
        for fan_in, fan_out in per_block * blocks + [(c, c)] * 2 * transformers:
            shapes += [(rank, fan_in), (fan_out, rank)]
    return shapes


def _bnb_adamw8bit():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    return bnb.optim.AdamW8bit


OPTIMIZERS = {
    "gesso-adamw8bit": lambda ps: AdamW8bit(ps, lr=1e-4),
    "torch-adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    "bnb-adamw8bit": lambda ps: _bnb_adamw8bit()(ps, lr=1e-4),
}
# bytes per parameter and step (fp32 params and grads): 8-bit reads p, g, 2 codes and writes p, 2 codes;
# fused fp32 AdamW reads p, g, m, v and writes p, m, v
BYTES_PER_PARAM = {"gesso-adamw8bit": 16, "bnb-adamw8bit": 16, "torch-adamw-fused": 28}


@pytest.mark.parametrize("impl", ["gesso-adamw8bit", "torch-adamw-fused", gpu_only("bnb-adamw8bit")])
@pytest.mark.parametrize("rank", [16, 64] if ON_GPU else [4])
def bench_adamw_step(benchmark, rank, impl):
    shapes = sdxl_lora_shapes(rank, scale=1 if ON_GPU else 16)
    params = [torch.randn(s, device=DEVICE) * 0.02 for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = OPTIMIZERS[impl](params)
    n = sum(p.numel() for p in params)
    label = impl if ON_GPU or impl != "gesso-adamw8bit" else "gesso-adamw8bit-reference"  # CPU takes the reference
    harness.run(benchmark, "adamw", f"sdxl-lora-r{rank}-{len(shapes)}-tensors-{n / 1e6:.1f}M",
                label, opt.step, bytes_moved=BYTES_PER_PARAM[impl] * n, dtype=torch.float32)
