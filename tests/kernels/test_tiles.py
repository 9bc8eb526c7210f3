"""Every autotune configuration computes the same function: on a GPU the tuner may pick any of them per shape.

The parity tests elsewhere in this folder run whichever tile the tuner picks for their (small) shapes; here each
configuration of the LoRA linear and attention kernels is forced in turn at a shape larger than its tile. Under
the interpreter the kernels carry one fixed configuration, checked by the other tests: conftest.py collects this
file on a GPU only.
"""
import pytest
import torch
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError

from gesso.kernels import attention as attn
from gesso.kernels import lora_linear as lin
from gesso.kernels import tiles
from test_attention import _check as check_attention
from test_attention import _qkv
from test_lora_linear import _inputs, _run_and_check


def _forcing(monkeypatch, kernel, cfg):
    """Make autotuned `kernel` run `cfg` alone: a one-config tuner launches it without timing."""
    monkeypatch.setattr(kernel, "configs", [cfg])
    monkeypatch.setattr(kernel, "cache", {})


def _launched(run) -> bool:
    """True when the forced tile ran; False where this GPU cannot build it (shared memory, registers): the errors
    Triton's autotuner skips a configuration for, so such a tile is never picked."""
    try:
        run()
    except (OutOfResources, PTXASError, CompileTimeAssertionFailure):
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_lora_linear_tile(dtype, device, assert_parity, monkeypatch):
    ran = 0
    for fwd, dx in zip(tiles.LORA_FWD, tiles.LORA_DX, strict=True):
        _forcing(monkeypatch, lin._lora_linear_fwd_kernel, fwd)
        _forcing(monkeypatch, lin._lora_linear_bwd_dx_kernel, dx)
        # rows 300 and features 320/384: larger than every tile, ragged at each edge
        ran += _launched(lambda: _run_and_check(assert_parity, *_inputs((2, 150, 320), 384, 16, dtype, device), scale=0.5))
    assert ran >= len(tiles.LORA_FWD) - 1, f"only {ran} of {len(tiles.LORA_FWD)} tiles launched"


@pytest.mark.parametrize("head_dim", [64, 80, 160])  # one per padded class (64, 128, 256): 40 shares 64's tiles
def test_every_attention_tile(head_dim, device, assert_parity, monkeypatch):
    padded = min(d for d in tiles.ATTENTION_FWD if d >= head_dim)
    tiles = [tiles.ATTENTION_FWD[padded], tiles.ATTENTION_DKDV[padded], tiles.ATTENTION_DQ[padded]]
    kernels = [attn._attention_fwd_kernel, attn._attention_bwd_dkdv_kernel, attn._attention_bwd_dq_kernel]
    ran = total = 0
    for kernel, listed in zip(kernels, tiles):
        for m, n, warps, stages in listed:
            for other, others in zip(kernels, tiles):  # the other two passes keep their first tile
                pick = (m, n, warps, stages) if other is kernel else others[0]
                _forcing(monkeypatch, other, tiles.config(pick[2], pick[3], BLOCK_M=pick[0], BLOCK_N=pick[1]))
            total += 1
            ran += _launched(lambda: check_attention(assert_parity, *_qkv(1, 2, 300, 333, head_dim, torch.bfloat16, device)))
    assert ran >= total - 1, f"only {ran} of {total} tiles launched"
