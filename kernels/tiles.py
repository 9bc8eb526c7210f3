"""The tiles each autotuned kernel may be timed over, and the shared memory each one costs.

LoRA linear: (BLOCK_M, output tile BLOCK_N, reduction step BLOCK_K) for the forward, the same shapes with N and K
swapped for the dx pass. Attention: (BLOCK_M, BLOCK_N, warps, stages) per padded head dim. Each list comes with its
`DevicePruned`: the tiles that fit a call's shape, then those whose predicted shared memory fits the device
(kernels/tuning.py). The predictions count the tiles each loop step loads times the pipeline's buffers;
benchmarks/compile_targets.py compiles every tile for every target and checks them against the compiler's figure.
"""
from gesso.kernels.tuning import DevicePruned, buffers, config, fits

# (BLOCK_M, output tile BLOCK_N, reduction step BLOCK_K): Hopper/Ada tiles first, then short-row ones (77 tokens)
LORA_FWD = [config(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
            config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
            config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), config(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64)]
# the dx pass tiles (rows, input columns) and reduces over the outputs: the same shapes with N and K swapped
LORA_DX = [config(c.num_warps, c.num_stages, BLOCK_M=c.kwargs["BLOCK_M"], BLOCK_K=c.kwargs["BLOCK_N"], BLOCK_N=64)
           for c in LORA_FWD]
LORA_INTERPRETER = config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
LORA_DOWN = dict(BLOCK_M=64, BLOCK_K=64)  # d_down: fixed, its split of M over programs is sized from these


def _pipelined_bytes(c, kwargs, arch, a: int, w: int, r: int, fp8: bool) -> int:
    """Shared memory of one k step's tiles (activations a, frozen weight w, rank-r operand r, in bytes) over the
    pipeline's buffers. Off Hopper an fp8 W leaves the activations two buffers; on Hopper a converted copy of the fp8 W
    tile comes on top; fp32 (FMA) dots stage the (rows, rank) product once more. As Triton 3.6 and 3.9 allocate:
    exact on every target and tile that benchmarks/compile_targets.py compiles."""
    ieee, rows = kwargs["DOT_PRECISION"] == "ieee", c.kwargs["BLOCK_M"]
    copies = buffers(arch, c.num_stages, rows, c.num_warps, ieee)
    if copies == c.num_stages:  # Hopper's wgmma path
        return copies * (a + w + r) + (w if fp8 else 0)
    product = rows * kwargs["BLOCK_R"] * 4 if ieee else 0
    return copies * (w + r) + (min(copies, 2) if fp8 else copies) * a + product


def _lora_fwd_shared(c, args, kwargs, arch) -> int:
    bm, bn, bk, br = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], kwargs["BLOCK_R"]
    ex, ew = args["x_ptr"].element_size(), args["w_ptr"].element_size()
    return _pipelined_bytes(c, kwargs, arch, bm * bk * ex, bn * bk * ew, br * bk * ex, ew == 1)


def _lora_dx_shared(c, args, kwargs, arch) -> int:
    bm, bn, bk, br = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], kwargs["BLOCK_R"]
    ex, ew = args["dy_ptr"].element_size(), args["w_ptr"].element_size()
    scale = (c.num_stages - 1) * bn * 4 if kwargs["W_SCALE"] == 2 else 0  # per-channel fp32 scales (W_SCALE_CHANNEL)
    return _pipelined_bytes(c, kwargs, arch, bm * bn * ex, bn * bk * ew, bn * br * ex, ew == 1) + scale


LORA_FWD_PRUNE = DevicePruned(lambda configs, args, **kw: fits(configs, {"BLOCK_M": args["M"], "BLOCK_N": args["N"]}),
                              _lora_fwd_shared)
LORA_DX_PRUNE = DevicePruned(lambda configs, args, **kw: fits(configs, {"BLOCK_M": args["M"], "BLOCK_K": args["K"]}),
                             _lora_dx_shared)


# Tiles per padded head dim: the fp32 accumulators (BLOCK_M or BLOCK_N rows x BLOCK_D) must fit in registers.
# Forward and dQ tile the queries (BLOCK_M) and stream the keys (BLOCK_N); dK/dV tile the keys and stream the queries.
ATTENTION_FWD = {64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (32, 64, 4, 2)],
                 128: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)],
                 256: [(64, 32, 8, 2), (32, 32, 8, 2), (32, 16, 4, 2)]}
ATTENTION_DKDV = {64: [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2)],
                  128: [(32, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
                  256: [(32, 32, 8, 2), (16, 32, 4, 2)]}
ATTENTION_DQ = {64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
                128: [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
                256: [(32, 32, 8, 2), (32, 16, 4, 2)]}
ATTENTION_INTERPRETER = config(4, 2, BLOCK_M=64, BLOCK_N=64)


def attention_configs(tiles: dict) -> list:
    unique = dict.fromkeys(t for d in tiles for t in tiles[d])  # a tile listed for two head dims is timed once
    return [config(w, s, BLOCK_M=m, BLOCK_N=n) for m, n, w, s in unique]


def _attention_shape(tiles: dict, tiled: str, length: str):
    """Keep the tiles listed for this call's padded head dim whose `tiled` block does not exceed the `length` argument."""
    def prune(configs, args, **kwargs):
        allowed = set(tiles[min(d for d in tiles if d >= kwargs["BLOCK_D"])])
        mine = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        return fits(mine, {tiled: args[length]})
    return prune


def _attention_shared(held: str, kept: int, streamed: str):
    """Predicted shared memory: `kept` tiles of `held` rows x BLOCK_D held across the loop (q; q and dO; k and v),
    two tiles of `streamed` rows loaded per step over the pipeline's buffers; with a head dim not divisible by 16 the
    masked loads are not pipelined and one streamed tile is staged. fp32 (FMA) dots stage the (BLOCK_M, BLOCK_N)
    probabilities too, and keep the dK/dV pass's k and v in registers. Within 25% of the compiler's figure for 16-bit
    tiles, and on the same side of every target's limit (benchmarks/compile_targets.py checks this on each)."""
    def shared(c, args, kwargs, arch) -> int:
        ieee = kwargs["DOT_PRECISION"] == "ieee"
        row_bytes = kwargs["BLOCK_D"] * args["q_ptr"].element_size()
        held_bytes = (0 if ieee and held == "BLOCK_N" else kept) * c.kwargs[held] * row_bytes
        step = 2 * c.kwargs[streamed] * row_bytes
        scores = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * 4 if ieee else 0
        if args["D"] % 16:
            return held_bytes + step // 2 + scores
        return held_bytes + buffers(arch, c.num_stages, c.kwargs[held], c.num_warps, ieee) * step + scores
    return shared


ATTENTION_FWD_PRUNE = DevicePruned(_attention_shape(ATTENTION_FWD, "BLOCK_M", "Tq"),
                                   _attention_shared("BLOCK_M", 1, "BLOCK_N"))
ATTENTION_DKDV_PRUNE = DevicePruned(_attention_shape(ATTENTION_DKDV, "BLOCK_N", "Tk"),
                                    _attention_shared("BLOCK_N", 2, "BLOCK_M"))
ATTENTION_DQ_PRUNE = DevicePruned(_attention_shape(ATTENTION_DQ, "BLOCK_M", "Tq"),
                                  _attention_shared("BLOCK_M", 2, "BLOCK_N"))
