"""Gradient checkpointing per res-block and transformer block: what it recomputes, counted by FlopCounterMode.

The recomputation must cost the same whatever the frozen weights' storage: with fp8 bases, a conv that
closes a checkpointed unit must not run again in backward only to save its weight (engine/memory/fp8.py)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gesso.engine.lora import names
from gesso.engine.lora import network as lora
from gesso.engine.memory import fp8
from gesso.models.configs import UNetConfig
from gesso.models.unet import UNet

# depth 3 at the lowest level: a pair and a single block per transformer (SpatialTransformer.group)
DEEP = UNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 3), transformer_depth_middle=3,
                  head_dim=16, context_dim=32, adm_in_channels=None)


def _unet(fp8_base: bool, dtype: torch.dtype) -> UNet:
    torch.manual_seed(0)
    unet = UNet(DEEP).requires_grad_(False).to(dtype)
    network = lora.inject(unet, names.attention_targets(unet) + names.locon_targets(unet), "lora_unet_", 4, 4)
    with torch.no_grad():
        for m in network.modules.values():
            m.lora_up.normal_(0, 0.02)
    if fp8_base:
        fp8.quantize_frozen(unet)
    return unet


def _inputs(dtype):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 16, 16, generator=g).to(dtype), torch.tensor([500]),
            torch.randn(1, 77, 32, generator=g).to(dtype))


def _step_flops(unet: UNet, checkpointing: bool, dtype) -> int:
    unet.gradient_checkpointing = checkpointing
    with FlopCounterMode(display=False) as counter:
        unet(*_inputs(dtype)).float().square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.slow
def test_fp8_bases_recompute_exactly_what_plain_bases_recompute():
    dtype = torch.float32  # the count is the same in bf16 (ops and shapes do not change), 10x slower on a CPU
    forward = {}
    recomputed = {}
    for fp8_base in (False, True):
        unet = _unet(fp8_base, dtype)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(*_inputs(dtype))
        forward[fp8_base] = counter.get_total_flops()
        recomputed[fp8_base] = _step_flops(unet, True, dtype) - _step_flops(unet, False, dtype)
    assert forward[True] == forward[False]  # the same convs and matmuls, whatever the storage
    assert 0 < recomputed[False] < forward[False]  # checkpointing recomputes part of the forward, never more
    assert recomputed[True] == recomputed[False], recomputed


def test_checkpointing_gives_the_same_loss_and_grads_bit_for_bit():
    unet = _unet(True, torch.float32)
    grads, losses = [], []
    for checkpointing in (False, True):
        unet.gradient_checkpointing = checkpointing
        unet.zero_grad(set_to_none=True)
        loss = unet(*_inputs(torch.float32)).square().mean()
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in unet.parameters() if p.requires_grad])
    assert losses[0] == losses[1]
    assert all(torch.equal(a, b) for a, b in zip(*grads)) and len(grads[0]) > 20


def test_units_are_every_res_block_and_transformer_block_in_forward_order():
    unet = UNet(DEEP)
    units = unet.units()
    assert len(units) == 12 + 18 and units[0] is unet.input_blocks[1][0]  # 12 res-blocks, 6 transformers of 3 blocks
    assert units[-1] is unet.output_blocks[-1][0] and units.index(unet.middle_block[2]) == units.index(unet.middle_block[0]) + 4
    assert units.index(unet.middle_block[1].transformer_blocks[2]) == units.index(unet.middle_block[0]) + 3
