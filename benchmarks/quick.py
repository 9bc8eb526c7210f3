"""Driver of the GPU session's `quick` stage (benchmarks/gpu_session.sh): one step per call, so that each step
runs under its own time limit, every call adding what it measured to one results file as soon as it has it.

    python -m benchmarks.quick rows --results R.json --systems engine --modes bf16-ckpt,fp8-ckpt
    python -m benchmarks.quick rows --results R.json --systems peer        # diffusers + PEFT, bf16 only
    python -m benchmarks.quick rows --results R.json --systems graph       # engine kernels, CUDA-graph replay
    python -m benchmarks.quick loss --results R.json --steps 50            # kernels vs reference, bf16
    python -m benchmarks.quick predict --out P.json                        # the memory predictor, no GPU needed
    python -m benchmarks.summary --results R.json --predictions P.json --out FINAL.json   # benchmarks/summary.py

Systems on the same random weights, latents and text embeddings (seeded; `peer.make_inputs`): `engine` = the
engine's kernels (AdamW8bit) and its reference path (torch.optim.AdamW) on one model (`bench.run_case`, the code
`gesso bench` runs); `peer` = diffusers' UNet2DConditionModel with PEFT LoRA on the same modules, SDPA, the
reference path's optimizer (`engine/measure/peer.py`); `graph` = the engine's kernels with forward and backward
replayed as a CUDA graph (`engine/measure/graphs.py`). MFU is each row's counted FLOPs per second over the bf16
matmul rate measured on this GPU (`harness.matmul_peak_tflops`, once per results file). On a CPU the same
calls run tiny-sdxl at small sizes in fp32: the dry run (tests/benchmarks/test_quick.py), not figures.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from triton.errors import TritonError

from benchmarks import summary
from gesso import models
from gesso.engine import diffusion
from gesso.engine.config.sections import Config, DatasetSection, ModelSection, NetworkSection, TrainSection
from gesso.engine.io import write_bytes_atomic
from gesso.engine.lora import names
from gesso.engine.measure import bench, harness, peer
from gesso.engine.measure.graphs import GraphedStep
from gesso.engine.memory import memtrace
from gesso.kernels import fallback

MODES = {"bf16-ckpt": (False, True), "fp8-ckpt": (True, True), "bf16": (False, False)}  # (fp8 base, checkpointing)
SYSTEMS = ("engine", "peer", "graph")
# what one row may die of without taking the others: Triton's compile and launch errors (CompilationError, PTXASError,
# OutOfResources, ...), CUDA and shape errors, failed checks, out of memory (a RuntimeError)
ROW_ERRORS = (TritonError, RuntimeError, AssertionError, ValueError)


def load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return dict(env=dict(harness.environment(), driver=bench.driver_version()), peak=None, rows=[], loss_checks=[])


def save(path: Path, results: dict) -> None:
    write_bytes_atomic(path, (json.dumps(results, indent=1) + "\n").encode())


def setting(args) -> tuple[torch.device, torch.dtype, str, int]:
    """Device, dtype, model and resolution: the arguments on a GPU, tiny-sdxl in fp32 at a small size on a CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16, args.model or "sdxl", args.resolution or 1024
    return torch.device("cpu"), torch.float32, args.model or "tiny-sdxl", args.resolution or 64


def lora_module_count(model: str) -> int:
    return len(names.attention_targets(names.meta_unet(models.configs.get(model).unet)))


def row(system: str, case: bench.Case, dtype, optimizer: str, seconds: float, tflop: float, peaks: tuple,
        peak_tflops: float | None, steps: int, warmup: int, modules: int) -> dict:
    return dict(system=system, model=case.model, resolution=case.resolution, batch=case.batch, rank=case.rank,
                base_weights=bench.base_weights(case, dtype), gradient_checkpointing=case.gradient_checkpointing,
                optimizer=optimizer, lora_modules=modules, steps=steps, warmup=warmup, seconds_per_step=seconds,
                images_per_s=case.batch / seconds, tflop_per_step=tflop,
                mfu=tflop / seconds / peak_tflops if peak_tflops and tflop else None,
                peak_allocated_gib=peaks[0], peak_reserved_gib=peaks[1])


def engine_rows(case, args, device, dtype, peak, emit) -> None:
    """The reference path, then the kernels path, on one model: each row handed to `emit` as soon as it is measured
    (a kernels path that fails leaves the reference row written). A kernel that gave way to its reference during the
    kernels path (kernels/fallback.py) is named in that row's `gave_way`."""
    bench.release(device)
    unet, network = bench.build(case, device, dtype)
    b = bench.make_batch(case, 0, device, dtype)
    tflop, modules = None, lora_module_count(case.model)
    try:
        for path in ("reference", "kernels"):
            before = len(fallback.given_way)
            try:
                seconds, allocated, reserved, flops = bench.time_path(path, unet, network, b, args.steps, args.warmup,
                                                                      device, count=path == "reference")
            except ROW_ERRORS as e:
                emit(failed(f"engine-{path}", case, e))
                continue
            tflop = flops[0] if flops else tflop
            optimizer = "AdamW8bit" if path == "kernels" else "torch.optim.AdamW"
            r = row(f"engine-{path}", case, dtype, optimizer, seconds, tflop, (allocated, reserved), peak, args.steps,
                    args.warmup, modules)
            emit(dict(r, gave_way=fallback.given_way[before:]) if path == "kernels" else r)
    finally:
        del unet, network, b
        bench.release(device)


def failed(system: str, case: bench.Case, e: BaseException) -> dict:
    return dict(system=system, model=case.model, resolution=case.resolution, batch=case.batch, rank=case.rank,
                error=f"{type(e).__name__}: {e}"[:2000])


def _flops(fn) -> float:
    with FlopCounterMode(display=False, custom_mapping=bench.CPU_SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def peer_row(case, args, device, dtype, peak) -> dict:
    """diffusers + PEFT on the engine's weights: its own FLOP count (FlopCounterMode sees all of its ops)."""
    bench.release(device)
    unet, network = bench.build(case, device, dtype)
    p = peer.build_peer(unet, network, case.gradient_checkpointing)
    modules = len(peer.lora_layers(p))
    del unet, network  # the base weights stay, shared with the peer; the engine's LoRA weights go
    inputs = peer.make_inputs(case, 0, device, dtype)
    opt = peer.optimizer(p, device)
    tflop = _flops(lambda: peer.step(p, opt, inputs))
    seconds, *peaks = harness.time_steps(lambda: peer.step(p, opt, inputs), args.steps, args.warmup, device)
    del p, opt, inputs
    bench.release(device)
    return row("diffusers-peft", case, dtype, "torch.optim.AdamW", seconds, tflop, peaks, peak, args.steps, args.warmup,
               modules)


def graph_row(case, args, device, dtype, peak) -> dict:
    """The engine's kernels path with forward + backward captured once and replayed (CUDA only)."""
    if device.type != "cuda":
        raise RuntimeError("a CUDA graph needs a CUDA GPU; this machine has none")
    bench.release(device)
    unet, network = bench.build(case, device, dtype)
    b = bench.make_batch(case, 0, device, dtype)
    with bench.kernel_path("reference"):
        tflop, _ = bench.count_flops(unet, bench.optimizer("reference", network, device), b)
    opt = bench.optimizer("kernels", network, device)
    with bench.kernel_path("kernels"):
        # the same model eagerly first: the graph's speed-up from one process, whatever the other rows did
        eager, *_ = harness.time_steps(lambda: bench.step(unet, opt, b), args.steps, args.warmup, device)
        graphed = GraphedStep(lambda: diffusion.epsilon_loss(unet(b.noisy, b.t, b.context, b.y), b.noise), opt, warmup=1)
        seconds, *peaks = harness.time_steps(graphed, args.steps, 1, device)
    del unet, network, b, opt, graphed
    bench.release(device)
    out = row("engine-kernels-cudagraph", case, dtype, "AdamW8bit", seconds, tflop, peaks, peak, args.steps,
              args.warmup, lora_module_count(case.model))
    return dict(out, eager_seconds_per_step=eager, eager_over_graph=eager / seconds)


def cmd_rows(args) -> int:
    device, dtype, model, resolution = setting(args)
    path = Path(args.results)
    results = load(path)
    if results["peak"] is None and device.type == "cuda":
        results["peak"] = dict(bf16_matmul_tflops=harness.matmul_peak_tflops(device), shape="8192x8192x8192",
                               timing="triton.testing.do_bench median, random bf16 inputs")
        save(path, results)
    peak = results["peak"]["bf16_matmul_tflops"] if results["peak"] else None
    failures = 0

    def emit(r: dict) -> None:  # each row reaches the results file as soon as it is measured
        nonlocal failures
        failures += "error" in r
        r["mode"] = mode
        print(json.dumps(r), flush=True)
        results["rows"].append(r)
        save(path, results)

    for mode in args.modes.split(","):
        fp8_base, ckpt = MODES[mode]
        case = bench.Case(model, resolution, args.batch, args.rank, fp8_base, ckpt)
        for system in args.systems.split(","):
            if system == "peer" and fp8_base:
                continue  # diffusers has no fp8 bases: the engine alone runs that mode
            try:
                if system == "engine":
                    engine_rows(case, args, device, dtype, peak, emit)
                else:
                    emit({"peer": peer_row, "graph": graph_row}[system](case, args, device, dtype, peak))
            except ROW_ERRORS as e:  # the next row still runs
                emit(failed(system, case, e))
    return 1 if failures else 0


def cmd_loss(args) -> int:
    device, dtype, model, resolution = setting(args)
    path = Path(args.results)
    results = load(path)
    case = bench.Case(model, resolution, args.batch, args.rank, False, True)
    check = bench.loss_check(case, args.steps, args.lr, device, dtype)
    print(bench.describe_loss(check), flush=True)
    results["loss_checks"].append(dataclasses.asdict(check))
    save(path, results)
    return 0 if check.passed else 1


def cmd_predict(args) -> int:
    """The predictor's peak for every engine row the stage times (the peer is another model: no prediction)."""
    gpu = torch.cuda.is_available() and not args.cpu_sizes
    model, resolution = args.model or ("sdxl" if gpu else "tiny-sdxl"), args.resolution or (1024 if gpu else 64)
    out = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}  # other sizes' predictions stay
    for mode in args.modes.split(","):
        fp8_base, ckpt = MODES[mode]
        for optimizer in summary.OPTIMIZER_NAMES.values():
            cfg = Config(model=ModelSection(name=model), dataset=DatasetSection(resolution=resolution),
                         network=NetworkSection(rank=args.rank, alpha=float(args.rank)),
                         train=TrainSection(batch_size=args.batch, optimizer=optimizer, gradient_checkpointing=ckpt,
                                            fp8_base=fp8_base, mixed_precision="bf16" if gpu else "no"))
            p = memtrace.predict(cfg)
            base = "fp8-e4m3" if fp8_base else ("bfloat16" if gpu else "float32")
            out[summary.prediction_key(model, resolution, args.batch, args.rank, base, ckpt, optimizer)] = p.peak_gib
            print(p.describe(), flush=True)
    write_bytes_atomic(args.out, (json.dumps(out, indent=1) + "\n").encode())
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quick", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("rows", "loss", "predict"):
        s = sub.add_parser(name)
        s.add_argument("--model")
        s.add_argument("--resolution", type=int)
        s.add_argument("--batch", type=int, default=1)
        s.add_argument("--rank", type=int, default=16)
        s.add_argument("--modes", default="bf16-ckpt,fp8-ckpt")
    rows, loss, predict = (sub.choices[n] for n in ("rows", "loss", "predict"))
    rows.add_argument("--results", required=True)
    rows.add_argument("--systems", default="engine,peer")
    rows.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported")
    rows.add_argument("--warmup", type=int, default=3)
    loss.add_argument("--results", required=True)
    loss.add_argument("--steps", type=int, default=50)
    loss.add_argument("--lr", type=float, default=1e-4)
    predict.add_argument("--out", required=True)
    predict.add_argument("--cpu-sizes", action="store_true", help="the CPU dry run's sizes even where a GPU is present")
    args = p.parse_args(argv)
    if getattr(args, "systems", None) and not set(args.systems.split(",")) <= set(SYSTEMS):
        p.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    if getattr(args, "modes", None) and not set(args.modes.split(",")) <= set(MODES):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    run = {"rows": cmd_rows, "loss": cmd_loss, "predict": cmd_predict}[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
