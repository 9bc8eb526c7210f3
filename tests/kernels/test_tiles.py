"""Every autotune configuration computes the same function: on a GPU the tuner may pick any of them per shape.

The parity tests elsewhere in this folder run whichever tile the tuner picks for their (small) shapes; here each
configuration of the LoRA linear and attention kernels is forced in turn at a shape larger than its tile. A tile this
GPU cannot hold (its predicted shared memory over the device's per-block limit: the tuner prunes it before compiling,
kernels/tuning.py) is skipped with that reason. Under the interpreter the kernels carry one fixed configuration,
checked by the other tests: conftest.py collects this file on a GPU only.
"""
import pytest
import torch

from gesso.kernels import attention as attn
from gesso.kernels import device as gpus
from gesso.kernels import lora_linear as lin
from gesso.kernels import tiles
from gesso.kernels.tuning import describe
from test_attention import _check as check_attention
from test_attention import _qkv
from test_lora_linear import _inputs, _run_and_check


def _forcing(monkeypatch, kernel, cfg):
    """Make autotuned `kernel` run `cfg` alone: a one-config tuner launches it without timing (nor pruning)."""
    monkeypatch.setattr(kernel, "configs", [cfg])
    monkeypatch.setattr(kernel, "cache", {})


def _skip_unless_held(prune, cfg, named_args: dict, kwargs: dict, device) -> None:
    why = prune.refusal(cfg, named_args, kwargs, gpus.gpu(torch.device(device)))
    if why:
        pytest.skip(f"not held by this GPU: {why}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index", range(len(tiles.LORA_FWD)), ids=[describe(c) for c in tiles.LORA_FWD])
def test_every_lora_linear_tile(index, dtype, device, assert_parity, monkeypatch):
    # rows 300 and features 320/384: larger than every tile, ragged at each edge
    x, w, b, down, up = _inputs((2, 150, 320), 384, 16, dtype, device)
    fwd, dx = tiles.LORA_FWD[index], tiles.LORA_DX[index]
    kwargs = dict(lin._meta(16, dtype), W_SCALE=lin.W_SCALE_NONE)
    _skip_unless_held(tiles.LORA_FWD_PRUNE, fwd, {"x_ptr": x, "w_ptr": w}, kwargs, device)
    _skip_unless_held(tiles.LORA_DX_PRUNE, dx, {"dy_ptr": x, "w_ptr": w}, kwargs, device)
    _forcing(monkeypatch, lin._lora_linear_fwd_kernel, fwd)
    _forcing(monkeypatch, lin._lora_linear_bwd_dx_kernel, dx)
    _run_and_check(assert_parity, x, w, b, down, up, scale=0.5)


def _attention_cases():
    """(head dim, pass, tile) for each listed tile; one head dim per padded class (64, 128, 256): 40 shares 64's."""
    passes = {"fwd": tiles.ATTENTION_FWD, "dkdv": tiles.ATTENTION_DKDV, "dq": tiles.ATTENTION_DQ}
    return [pytest.param(d, name, tile, id=f"d{d}-{name}-{tile[0]}x{tile[1]}w{tile[2]}s{tile[3]}")
            for d, padded in ((64, 64), (80, 128), (160, 256)) for name, listed in passes.items() for tile in listed[padded]]


@pytest.mark.parametrize("head_dim,forced,tile", _attention_cases())
def test_every_attention_tile(head_dim, forced, tile, device, assert_parity, monkeypatch):
    padded = min(d for d in tiles.ATTENTION_FWD if d >= head_dim)
    kernels = {"fwd": (attn._attention_fwd_kernel, tiles.ATTENTION_FWD, tiles.ATTENTION_FWD_PRUNE),
               "dkdv": (attn._attention_bwd_dkdv_kernel, tiles.ATTENTION_DKDV, tiles.ATTENTION_DKDV_PRUNE),
               "dq": (attn._attention_bwd_dq_kernel, tiles.ATTENTION_DQ, tiles.ATTENTION_DQ_PRUNE)}
    q, k, v = _qkv(1, 2, 300, 333, head_dim, torch.bfloat16, device)
    kwargs = dict(BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()), DOT_PRECISION="tf32")
    for name, (kernel, listed, prune) in kernels.items():  # the other two passes keep their first tile
        m, n, warps, stages = tile if name == forced else listed[padded][0]
        cfg = tiles.config(warps, stages, BLOCK_M=m, BLOCK_N=n)
        _skip_unless_held(prune, cfg, {"q_ptr": q, "D": head_dim}, kwargs, device)
        _forcing(monkeypatch, kernel, cfg)
    check_attention(assert_parity, q, k, v)
