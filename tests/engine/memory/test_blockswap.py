"""Block swap changes nothing but where the frozen weights wait: the CPU as both host and device, bit for bit."""
import copy

import pytest
import torch

from gesso import models
from gesso.engine.lora import names
from gesso.engine.lora import network as lora
from gesso.engine.memory import fp8
from gesso.engine.memory.blockswap import BlockSwap, frozen_bytes
from gesso.errors import ConfigError


def _unet(fp8_base: bool, locon: bool = True):
    unet = models.build("tiny-sdxl", seed=0).unet.requires_grad_(False)
    network = lora.inject(unet, names.attention_targets(unet) + (names.locon_targets(unet) if locon else []), "lora_unet_", 4, 4)
    with torch.no_grad():
        for m in network.modules.values():
            m.lora_up.normal_(0, 0.02)  # non-zero ups: every LoRA gradient is non-trivial
    if fp8_base:
        fp8.quantize_frozen(unet)
    unet.gradient_checkpointing = True
    return unet, network


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.randint(0, 1000, (1,), generator=g),
            torch.randn(1, 77, 96, generator=g), torch.randn(1, 1600, generator=g))


def _train(unet, steps: int, watch=None):
    lora_params = [p for _, p in sorted((n, p) for n, p in unet.named_parameters() if p.requires_grad)]
    opt = torch.optim.AdamW(lora_params, lr=1e-2)
    losses, grads = [], []
    for step in range(steps):
        x, t, context, y = _batch(step)
        loss = (unet(x, t, context, y) - x).square().mean()
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in lora_params])
        if watch:
            watch()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


# fp8 without LoCon: the res-blocks' closing fp8 convs are bare, their backward the first of the unit to run
@pytest.mark.slow
@pytest.mark.parametrize("fp8_base, locon", [(False, True), (True, False)], ids=["bf16-locon", "fp8-attention-only"])
def test_losses_and_lora_grads_equal_the_unswapped_run_bit_for_bit(fp8_base, locon):
    unet, network = _unet(fp8_base, locon)
    swapped_unet = copy.deepcopy(unet)
    units = swapped_unet.units()
    swap = BlockSwap(swapped_unet, len(units) - 3, torch.device("cpu"))
    assert len(swap.index) == len(units) - 3 and swap.host_bytes > 0
    # the frozen weights of swapped blocks are gone from the model between uses: None in their modules
    left = [frozen_bytes(units[i]) for i in swap.index]
    assert left == [0] * len(left)
    assert len([p for p in swapped_unet.parameters() if p.requires_grad]) == len(network.parameters()) > 50

    installed = []
    reference = _train(unet, 3)
    swapped = _train(swapped_unet, 3, watch=lambda: installed.append(len(swap.installed)))
    assert reference[0] == swapped[0] and len(set(reference[0])) == 3  # losses, and they move
    for a, b in zip(reference[1], swapped[1]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the weights did travel: copies were made and freed, never all of them at once
    assert 0 < swap.peak_bytes < swap.host_bytes / 4 and max(installed) <= 2


def test_eval_forward_loads_and_drops_each_block_and_bad_counts_are_one_line():
    unet, _ = _unet(True)
    x, t, context, y = _batch(0)
    with torch.no_grad():
        expected = unet(x, t, context, y)
    swap = BlockSwap(unet, 4, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(unet(x, t, context, y), expected)
    assert not swap.installed and not swap.pending and swap.live_bytes == 0
    with pytest.raises(ConfigError, match=r"^train.blocks_to_swap = 99: this UNet has 34 blocks"):
        BlockSwap(unet, 99, torch.device("cpu"))
    unet.gradient_checkpointing = False
    with pytest.raises(ConfigError, match="needs train.gradient_checkpointing"):
        BlockSwap(unet, 2, torch.device("cpu"))
