"""Every Triton kernel compiled ahead of time for real GPU targets, on a CPU with no GPU or driver.

    python -m benchmarks.compile_targets                 # the quick subset: rank 16, head dim 64, bf16/fp16/fp8
    python -m benchmarks.compile_targets --full          # SDXL and SD 1.5 shapes, ranks 16 and 128, fp32 too
    python -m benchmarks.compile_targets --json OUT.json # every compile's record as well
    python -m benchmarks.compile_targets --warm          # on a GPU: one SDXL step's kernels into Triton's cache

Each kernel is launched by its own host launcher (`_forward`, `_backward`, `adamw8bit_step`) on meta tensors of a
real shape, with the kernel objects swapped for recorders, so the arguments are exactly those a GPU run passes. Each
recorded launch is then compiled with Triton's own compiler for an explicit `GPUTarget` (its bundled ptxas, no
driver), once per autotune configuration the launch's shape leaves to the tuner, with the argument specialisation
(16-byte alignment, divisibility by 16) that `JITFunction.run` would make. Identical compiles are done once.

Recorded per compile: shared memory (`metadata.shared`, what Triton checks against the device before a launch),
registers and spills (ptxas -v), seconds, or the error. The run fails (exit 1) when
- a configuration the dispatch can reach on a target does not compile (fp8 weights are reached from sm_89);
- a shape has no configuration that compiles and fits the target's shared memory;
- the tuner's device pruning (kernels/tuning.py) keeps a tile that does not fit, or drops one that does.
"""
import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import triton

from benchmarks import aot
from gesso.kernels import adamw8bit, attention, lora_linear
from gesso.kernels import device as gpus
from gesso.kernels.device import SHARED_MEMORY_OPTIN
from gesso.kernels.fallback import describe as describe_error
from gesso.kernels.tuning import describe

TARGETS = (80, 86, 89, 90, 120)
FP8_TARGETS = (89, 90, 120)  # the dispatch sends fp8 weights to the kernel from sm_89 (tl.float8e4nv)
FP8 = torch.float8_e4m3fn
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One call of a public kernel entry point at a real shape: `op`, a label, the dtypes, the launcher call on meta
    tensors, and the targets it is compiled for."""
    op: str
    label: str
    dtype: str  # activations (LoRA linear, attention) or parameters (AdamW8bit); "fp8+bf16": fp8 weights, bf16 x
    cls: str  # what else picks the compiled code: the rank, the head dim
    call: object
    targets: tuple = TARGETS


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def lora(label: str, m: int, k: int, n: int, rank: int, dtype: str, fp8: bool = False, bias: bool = True,
         dropout: bool = False) -> Shape:
    act, p = DTYPES[dtype], 0.1 if dropout else 0.0

    def call():
        x = _meta(m, k, dtype=act)
        w = _meta(n, k, dtype=FP8 if fp8 else act)
        scale = _meta(n, dtype=torch.float32) if fp8 else None  # fp8_base quantises per output channel
        b = _meta(n, dtype=act) if bias else None
        down, up = _meta(rank, k, dtype=act), _meta(n, rank, dtype=act)
        y, xa = lora_linear._forward(x, w, scale, b, down, up, 1.0, p, 0)
        lora_linear._backward(_meta(m, n, dtype=act), x, w, scale, down, up, xa, 1.0, p, 0)
        if dropout:
            lora_linear.dropout_keep_mask(0, (m, k), p, "meta")

    name = f"fp8+{dtype}" if fp8 else dtype
    return Shape("lora_linear", label, name, f"rank {rank}{' dropout' if dropout else ''}", call,
                 FP8_TARGETS if fp8 else TARGETS)


def attn(label: str, heads: int, tq: int, tk: int, head_dim: int, dtype: str) -> Shape:
    act = DTYPES[dtype]

    def call():
        q, k, v = _meta(1, heads, tq, head_dim, dtype=act), _meta(1, heads, tk, head_dim, dtype=act), \
            _meta(1, heads, tk, head_dim, dtype=act)
        o, lse = attention._forward(q, k, v)
        attention._backward(torch.empty_like(o), q, k, v, o, lse)

    return Shape("attention", label, dtype, f"head dim {head_dim}", call)


def adamw(label: str, n: int, dtype: str) -> Shape:
    def call():
        p, g = _meta(n, dtype=DTYPES[dtype]), _meta(n, dtype=DTYPES[dtype])
        blocks = triton.cdiv(n, adamw8bit.BLOCK)
        state = dict(m_code=_meta(n, dtype=torch.uint8), v_code=_meta(n, dtype=torch.uint8),
                     m_absmax=_meta(blocks, dtype=torch.float32), v_absmax=_meta(blocks, dtype=torch.float32))
        adamw8bit.adamw8bit_step(p, g, state, 1e-4, 0.9, 0.999, 1e-8, 0.01, 1)

    return Shape("adamw8bit", label, dtype, "", call)


def sdxl_lora(rank: int, dtype: str, fp8: bool) -> list[Shape]:
    """SDXL at 1024 px, batch 1: level 1 (4096 tokens x 640), level 2 (1024 x 1280), 77 context tokens x 2048."""
    shapes = []
    for tokens, c in ((4096, 640), (1024, 1280)):
        shapes += [lora(f"SDXL {c} q/k/v", tokens, c, c, rank, dtype, fp8, bias=False),
                   lora(f"SDXL {c} out/proj", tokens, c, c, rank, dtype, fp8),
                   lora(f"SDXL {c} ff in", tokens, c, 8 * c, rank, dtype, fp8),
                   lora(f"SDXL {c} ff out", tokens, 4 * c, c, rank, dtype, fp8),
                   lora(f"SDXL {c} cross k/v", 77, 2048, c, rank, dtype, fp8, bias=False)]
    return shapes


def sd15_lora(rank: int, dtype: str, fp8: bool) -> list[Shape]:
    """SD 1.5 at 512 px, batch 1: 4096 x 320, 1024 x 640, 256 x 1280, the middle's 64 x 1280; 77 context x 768."""
    shapes = []
    for tokens, c in ((4096, 320), (1024, 640), (256, 1280), (64, 1280)):
        shapes += [lora(f"SD1.5 {c}@{tokens} q/k/v", tokens, c, c, rank, dtype, fp8, bias=False),
                   lora(f"SD1.5 {c}@{tokens} out", tokens, c, c, rank, dtype, fp8),
                   lora(f"SD1.5 {c}@{tokens} ff in", tokens, c, 8 * c, rank, dtype, fp8),
                   lora(f"SD1.5 {c}@{tokens} ff out", tokens, 4 * c, c, rank, dtype, fp8),
                   lora(f"SD1.5 {c}@{tokens} cross k/v", 77, 768, c, rank, dtype, fp8, bias=False)]
    return shapes


def attention_shapes(dtype: str, head_dims) -> list[Shape]:
    """SDXL's self-attention at 4096 and 1024 tokens and cross-attention to 77; SD 1.5's at its levels' head dims."""
    shapes = []
    for d in head_dims:
        if d == 64:  # SDXL: 10 heads at 4096 tokens, 20 at 1024
            shapes += [attn("SDXL self 4096", 10, 4096, 4096, 64, dtype), attn("SDXL self 1024", 20, 1024, 1024, 64, dtype),
                       attn("SDXL cross 4096x77", 10, 4096, 77, 64, dtype)]
        else:  # SD 1.5: 8 heads of 40, 80, 160 at 4096, 1024, 256 tokens
            tokens = {40: 4096, 80: 1024, 160: 256}[d]
            shapes += [attn(f"SD1.5 self {tokens}", 8, tokens, tokens, d, dtype),
                       attn(f"SD1.5 cross {tokens}x77", 8, tokens, 77, d, dtype)]
    return shapes


QUICK_TARGETS = {"bf16": (80, 89, 90, 120), "fp16": (89,), "fp8+bf16": (89, 90), "fp32": (80, 89, 90, 120)}


def quick() -> list[Shape]:
    """CI's default subset, rank 16 and head dim 64 on one shape per op that every tile fits (SDXL's level 1):
    bf16 on sm_80, 89, 90 and 120 (sm_86 compiles sm_80's code; its limit is sm_89's), fp16 on sm_89, fp8 weights
    on sm_89 and 90, the optimizer's fp32 parameters everywhere: about two minutes on two cores."""
    shapes = [lora("SDXL 640 out/proj", 4096, 640, 640, 16, "bf16"), attn("SDXL self 4096", 10, 4096, 4096, 64, "bf16"),
              lora("SDXL 640 out/proj", 4096, 640, 640, 16, "fp16"), attn("SDXL self 4096", 10, 4096, 4096, 64, "fp16"),
              lora("SDXL 640 out/proj", 4096, 640, 640, 16, "bf16", fp8=True), adamw("SDXL 640x16 down", 640 * 16, "fp32")]
    return [dataclasses.replace(s, targets=QUICK_TARGETS[s.dtype]) for s in shapes]


def full() -> list[Shape]:
    """Every target; SDXL and SD 1.5 shapes at ranks 16 and 128 in bf16, fp16 and fp8 weights (with either); head dims
    64, 80 and 160 (self- and cross-attention) and 40 (self); fp32, which only GESSO_KERNELS=triton or a measured
    dispatch table reaches (the GPU parity tests force it at small shapes), at one shape per op; the optimizer's three
    parameter dtypes; LoRA dropout's variant and its mask kernel."""
    shapes = []
    for dtype in ("bf16", "fp16"):
        for rank in (16, 128):
            for fp8 in (False, True):
                shapes += sdxl_lora(rank, dtype, fp8) + sd15_lora(rank, dtype, fp8)
        shapes += attention_shapes(dtype, (64, 80, 160)) + [s for s in attention_shapes(dtype, (40,)) if "self" in s.label]
    shapes += [lora("SDXL 640 out/proj", 4096, 640, 640, 16, "fp32"), attn("SDXL self 4096", 10, 4096, 4096, 64, "fp32")]
    shapes += [adamw("SDXL 640x16 down", 640 * 16, d) for d in ("fp32", "bf16", "fp16")]
    shapes += [lora("SDXL 640 out/proj", 4096, 640, 640, 16, "bf16", dropout=True)]
    return shapes


def plan(shapes: list[Shape]) -> tuple[list[dict], dict]:
    """Every (shape, target, launch, configuration) of the matrix, and the distinct compile jobs they need, keyed."""
    uses, jobs = [], {}
    for shape in shapes:
        for name, kernel, args, kwargs in aot.launches(shape.call):
            for cfg, launch in aot.variants(kernel, args, kwargs):
                for arch in shape.targets:
                    key = aot.job_key(aot.jit_of(kernel), arch, args, launch)
                    jobs.setdefault(key, aot.job(kernel, arch, args, launch))
                    uses.append(dict(shape=shape, arch=arch, kernel=kernel, name=name, config=cfg, args=args,
                                     kwargs=kwargs, key=key))
    return uses, jobs


def compile_all(jobs: dict, workers: int) -> dict:
    """{job key: compile_one's record}, in `workers` processes (each compile is single-threaded), one target at a time:
    a process compiles for one target only, as a GPU's own process does. Triton 3.6 carries state from one target's
    compile to the next in a process: sm_90 first, then the fp8-weight LoRA forward for sm_89 with bf16 activations
    emits Hopper's `cvt.bf16.f16`, which ptxas refuses for sm_89 (the same compile in a fresh process succeeds)."""
    results = {}
    for arch in sorted({job[2] for job in jobs.values()}):
        keys = [k for k, job in jobs.items() if job[2] == arch]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results.update(zip(keys, pool.map(aot.compile_one, [jobs[k] for k in keys])))
    return results


def judge(uses: list[dict], results: dict) -> list[str]:
    """The findings that fail the run (module docstring), one line each."""
    failures, groups = [], {}
    for u in uses:
        groups.setdefault((u["shape"], u["arch"], u["name"], id(u["args"])), []).append(u)
    for (shape, arch, name, _), group in groups.items():
        limit, where = SHARED_MEMORY_OPTIN[arch], f"sm_{arch} {name} at {shape.label} {shape.dtype} {shape.cls}"
        first = group[0]
        if first["config"] is None:  # a fixed launch: it must compile and fit
            r = results[first["key"]]
            if "error" in r:
                failures.append(f"{where}: {r['error']}")
            elif r["shared"] > limit:
                failures.append(f"{where}: {r['shared']} B of shared memory > {limit}")
            continue
        prune = first["kernel"].early_config_prune
        named = dict(zip(first["kernel"].fn.arg_names, first["args"]))
        kept = prune.fitting([u["config"] for u in group], named, first["kwargs"], arch, limit)
        for u in group:
            r, reached = results[u["key"]], any(u["config"] is c for c in kept)
            tile = describe(u["config"])
            if reached and "error" in r:
                failures.append(f"{where} {tile}: {r['error']}")
            elif "error" not in r and reached != (r["shared"] <= limit):
                verb = "keeps" if reached else "drops"
                failures.append(f"{where} {tile}: pruning {verb} it, the compiler says {r['shared']} B of {limit}")
        if not any("error" not in results[u["key"]] and results[u["key"]]["shared"] <= limit for u in group):
            failures.append(f"{where}: no tile compiles and fits {limit} B of shared memory")
    return failures


def table(uses: list[dict], results: dict) -> str:
    """One row per kernel, dtype, padded rank or head dim and tile: per target shared KiB / registers / spilled bytes
    (the largest over the shapes that compile it), `*` where it exceeds the target's shared memory, and the error."""
    targets = sorted({u["arch"] for u in uses})
    rows = {}
    for u in uses:
        tile = describe(u["config"]) if u["config"] else ""
        cells = rows.setdefault((u["name"].strip("_").removesuffix("_kernel"), u["shape"].dtype, u["shape"].cls, tile), {})
        r = results[u["key"]]
        cell = cells.setdefault(u["arch"], dict(shared=0, registers=0, spills=0, seconds=0.0))
        if "error" in r:
            cell["error"] = r["error"].split(":")[0]
            continue
        for k in ("shared", "registers", "spills"):
            cell[k] = max(cell[k], r[k] or 0)
        cell["seconds"] = max(cell["seconds"], r["seconds"])
    head = "| kernel | dtype | rank or head dim | tile | " + " | ".join(f"sm_{a}" for a in targets) + " |"
    lines = [head, "|" + "---|" * (4 + len(targets))]
    for (kernel, dtype, cls, tile), cells in sorted(rows.items()):
        out = []
        for a in targets:
            c = cells.get(a)
            if c is None:
                out.append("")
            elif "error" in c:
                out.append(c["error"])
            else:
                over = "*" if c["shared"] > SHARED_MEMORY_OPTIN[a] else ""
                out.append(f"{c['shared'] / 1024:.0f}{over} / {c['registers']} / {c['spills']}")
        lines.append(f"| {kernel} | {dtype} | {cls} | {tile} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def _warm_one(work: tuple) -> str | None:
    """Compile one job for this process's GPU through the JIT's own path (`warmup`: its cache key, no launch)."""
    module, name, arch, args, kwargs = work
    try:
        aot.jit_of(getattr(sys.modules[module], name)).warmup(*args, grid=(1,), **kwargs)
    except Exception as e:  # a kernel that cannot compile here is the step's business (kernels/fallback.py)
        return f"{name}: {describe_error(e)}"
    return None


def warm(workers: int) -> int:
    """On a GPU: compile every launch of one SDXL LoRA step (1024 px, rank 16, bf16 base, and fp8 from sm_89) that
    the tuner will compile here, `workers` processes at a time, into Triton's cache; the step's first run then loads
    them (about 110 kernels, each 1-3 s when compiled one after another by the tuner)."""
    gpu = gpus.gpu(torch.device("cuda"))
    shapes = sdxl_lora(16, "bf16", False) + (sdxl_lora(16, "bf16", True) if gpu.fp8 else []) + \
        attention_shapes("bf16", (64,)) + [adamw("SDXL 640x16 down", 640 * 16, "fp32")]
    uses, jobs = plan([dataclasses.replace(s, targets=(gpu.arch,)) for s in shapes])
    kept = set()
    for u in uses:  # what the device pruning keeps (kernels/tuning.py): the tuner compiles nothing else
        named = dict(zip(aot.jit_of(u["kernel"]).arg_names, u["args"]))
        candidates = [v["config"] for v in uses if v["kernel"] is u["kernel"] and v["args"] is u["args"]]
        if u["config"] is None or any(u["config"] is c for c in u["kernel"].early_config_prune.fitting(
                candidates, named, u["kwargs"], gpu.arch, gpu.shared_memory)):
            kept.add(u["key"])
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        errors = [e for e in pool.map(_warm_one, [jobs[k] for k in kept]) if e]
    print(f"Triton's cache now holds {len(kept) - len(errors)} of one SDXL step's {len(kept)} kernels for {gpu.name} "
          f"({time.perf_counter() - start:.0f} s, {workers} processes)" + "".join(f"\n  {e}" for e in errors), flush=True)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_targets", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the whole matrix (about an hour or more on two cores)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="compiling processes (default: one per core)")
    p.add_argument("--json", help="write every compile's record here")
    p.add_argument("--warm", action="store_true", help="on a GPU: compile one SDXL step's kernels into Triton's cache")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("TRITON_INTERPRET=1 is set: the kernels are interpreted, there is nothing to compile")
    if args.warm:
        if not torch.cuda.is_available():
            p.error("--warm compiles for this machine's GPU, and it has none")
        return warm(args.workers)
    # a fresh cache: ptxas must run for every compile to report registers and spills
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gesso-aot-")
    start = time.perf_counter()
    uses, jobs = plan(full() if args.full else quick())
    results = compile_all(jobs, args.workers)
    print(f"Triton {triton.__version__}, {len(jobs)} compiles for {len(uses)} (shape, target, tile) uses in "
          f"{time.perf_counter() - start:.0f} s with {args.workers} processes; cells: shared KiB (* over the target's "
          "limit) / registers / spilled bytes\n")
    print(table(uses, results))
    if args.json:
        records = [dict(op=u["shape"].op, shape=u["shape"].label, dtype=u["shape"].dtype, arch=u["arch"], kernel=u["name"],
                        tile=describe(u["config"]) if u["config"] else "", **results[u["key"]]) for u in uses]
        with open(args.json, "w") as f:
            json.dump(records, f, indent=0)
    failures = judge(uses, results)
    print("\n" + ("\n".join(f"FAIL {line}" for line in failures) if failures else "every reachable tile compiles and fits; "
                                                                                  "the device pruning matches the compiler"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
