"""Which tiles the autotuner may time: the lists, the pruning by shape, and one fixed tile under the interpreter."""
import pytest

from gesso.kernels import attention as attn
from gesso.kernels import lora_linear as lin
from gesso.kernels import tiles
from gesso.kernels.tuning import fits, interpreted

TUNED = [lin._lora_linear_fwd_kernel, lin._lora_linear_bwd_dx_kernel, attn._attention_fwd_kernel,
         attn._attention_bwd_dkdv_kernel, attn._attention_bwd_dq_kernel]


def _tiles(configs, *names):
    return {tuple(c.kwargs[n] for n in names) for c in configs}


def test_lists_hold_hopper_tiles_and_small_ones():
    big = [c for c in tiles.LORA_FWD if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (128, 256)]
    assert big and all(c.num_warps == 8 and c.num_stages in (3, 4) for c in big)
    assert {(128, 128), (32, 64)} <= _tiles(tiles.LORA_FWD, "BLOCK_M", "BLOCK_N")
    assert _tiles(tiles.LORA_DX, "BLOCK_M", "BLOCK_K") == _tiles(tiles.LORA_FWD, "BLOCK_M", "BLOCK_N")
    assert set(tiles.ATTENTION_FWD) == set(tiles.ATTENTION_DKDV) == set(tiles.ATTENTION_DQ) == {64, 128, 256}


@pytest.mark.parametrize("m,n,expected", [
    (4096, 640, None),  # SDXL level 1: every tile fits
    (77, 1280, {(64, 128), (64, 64), (32, 64)}),  # cross-attention k/v over one prompt chunk: short rows only
    (5, 16, {(32, 64)}),  # smaller than every tile: the smallest one alone
])
def test_pruning_keeps_the_tiles_that_fit(m, n, expected):
    kept = fits(tiles.LORA_FWD, {"BLOCK_M": m, "BLOCK_N": n})
    assert _tiles(kept, "BLOCK_M", "BLOCK_N") == (expected or _tiles(tiles.LORA_FWD, "BLOCK_M", "BLOCK_N"))


@pytest.mark.parametrize("block_d", [64, 128, 256])
def test_attention_pruning_follows_the_padded_head_dim(block_d):
    prune = tiles.ATTENTION_FWD_PRUNE.shape
    kept = prune(tiles.attention_configs(tiles.ATTENTION_FWD), {"Tq": 4096}, BLOCK_D=block_d)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept} == set(
        tiles.ATTENTION_FWD[block_d])


def test_interpreter_runs_one_fixed_tile_and_a_gpu_the_lists():
    if interpreted(lin._lora_linear_fwd_kernel.fn):
        assert all(kernel.configs == [kernel.configs[0]] for kernel in TUNED)
        assert lin._lora_linear_fwd_kernel.configs[0] is tiles.LORA_INTERPRETER
        assert attn._attention_fwd_kernel.configs[0] is tiles.ATTENTION_INTERPRETER
    else:
        assert lin._lora_linear_fwd_kernel.configs is tiles.LORA_FWD
        assert lin._lora_linear_bwd_dx_kernel.configs is tiles.LORA_DX
        assert len(attn._attention_fwd_kernel.configs) == len({t for ts in tiles.ATTENTION_FWD.values() for t in ts})
