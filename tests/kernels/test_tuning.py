"""Which tiles the autotuner may time: the lists, the pruning by shape, and one fixed tile under the interpreter."""
from types import SimpleNamespace

import pytest
import torch
import triton

from gesso.kernels import attention as attn
from gesso.kernels import device
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


class _Operand:
    """A tensor as the pruning reads it: a CUDA device, a dtype and its element size (no GPU is touched)."""

    def __init__(self, dtype):
        self.device, self.dtype = torch.device("cuda", 0), dtype

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@pytest.fixture
def gpu_with(monkeypatch):
    """Stub torch.cuda.get_device_properties with a device of `shared` bytes per block at capability `arch`."""
    def stub(shared: int, arch: int):
        props = SimpleNamespace(name=f"stub sm_{arch}", major=arch // 10, minor=arch % 10,
                                shared_memory_per_block_optin=shared, total_memory=24 * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
        device._gpu.cache_clear()
    yield stub
    device._gpu.cache_clear()


def _lora_fwd_args(dtype):
    return {"x_ptr": _Operand(dtype), "w_ptr": _Operand(dtype), "M": 4096, "N": 640, "K": 640, "R": 16}


def _lora_kwargs(dtype):
    return dict(BLOCK_R=16, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", W_SCALE=0)


# the tiles the compiler measured over each limit (benchmarks/compile_targets.py, Triton 3.9, the README's table)
@pytest.mark.parametrize("shared,arch,dtype,dropped", [
    (101376, 89, torch.bfloat16, {(128, 256, 3), (128, 128, 4)}),  # 99 KiB (RTX 40xx, L4): 100 and 102 KiB tiles out
    (101376, 89, torch.float32, {(128, 256, 3), (128, 128, 4), (128, 128, 3), (64, 128, 4)}),  # fp32: 4 of 6 out
    (232448, 90, torch.bfloat16, set()),  # 227 KiB (H100/H200): every tile fits, 150 KiB the largest
    (232448, 90, torch.float32, set()),  # fp32 FMA tiles top out at 212 KiB there
])
def test_device_pruning_drops_exactly_the_tiles_the_card_cannot_hold(gpu_with, shared, arch, dtype, dropped):
    gpu_with(shared, arch)
    kept = tiles.LORA_FWD_PRUNE(tiles.LORA_FWD, _lora_fwd_args(dtype), **_lora_kwargs(dtype))
    key = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages)  # noqa: E731
    assert {key(c) for c in tiles.LORA_FWD} - {key(c) for c in kept} == dropped


def test_attention_pruning_keeps_every_16_bit_tile_of_the_sdxl_head_on_a_99_kib_card(gpu_with):
    gpu_with(101376, 86)
    args = {"q_ptr": _Operand(torch.bfloat16), "D": 64, "Tq": 4096, "Tk": 4096}
    for prune, listed in ((tiles.ATTENTION_FWD_PRUNE, tiles.ATTENTION_FWD), (tiles.ATTENTION_DKDV_PRUNE, tiles.ATTENTION_DKDV),
                          (tiles.ATTENTION_DQ_PRUNE, tiles.ATTENTION_DQ)):
        kept = prune(tiles.attention_configs(listed), args, BLOCK_D=64, DOT_PRECISION="tf32")
        assert len(kept) == len(listed[64])


def test_nothing_the_device_pruning_drops_is_compiled(gpu_with):
    """Triton's own autotuner over the LoRA forward's tiles, its kernel a recorder: what it compiles and times is
    exactly what the pruning kept, before any compile."""
    gpu_with(101376, 89)
    compiled = []

    def forward(x_ptr, w_ptr, M, N, K, R, BLOCK_R, DOT_PRECISION, W_SCALE, BLOCK_M, BLOCK_N, BLOCK_K):
        pass

    class Recorder:  # stands in for the JIT function: `run` is where a real one compiles (then launches)
        fn, arg_names = staticmethod(forward), ["x_ptr", "w_ptr", "M", "N", "K", "R"]

        def run(self, *args, **kwargs):
            compiled.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_stages"]))

    tuner = triton.autotune(tiles.LORA_FWD, key=["M", "N", "K", "R"], prune_configs_by={"early_config_prune": tiles.LORA_FWD_PRUNE},
                            do_bench=lambda call, quantiles: (call(), [1.0, 1.0, 1.0])[1])(Recorder())
    args = _lora_fwd_args(torch.bfloat16)
    tuner.run(*args.values(), grid=(1,), **_lora_kwargs(torch.bfloat16))
    timed = set(compiled[:-1])  # each kept tile once for timing; the last call launches the chosen one
    assert timed == {(128, 128, 3), (64, 128, 4), (64, 64, 3), (32, 64, 3)} and compiled[-1] in timed
