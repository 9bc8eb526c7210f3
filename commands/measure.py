"""`gesso bench` and `gesso memory`: a training step's speed on this machine, and its peak GPU memory predicted without one."""
import argparse
import dataclasses
import datetime
import json
import math

import torch

from gesso.engine.config.load import load_config
from gesso.engine.io import write_bytes_atomic
from gesso.engine.measure import bench, harness
from gesso.engine.memory import memplan, memtrace
from gesso.errors import ConfigError


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time a LoRA training step: engine kernels vs the PyTorch reference path",
        description="Seconds per step, images/s, MFU and peak GPU memory of LoRA training on cached-latent shapes "
                    "(random weights, real shapes), for the engine's kernels and the reference path in one process, "
                    "and a loss check of the two paths. Without a GPU it runs tiny-sdxl at small sizes and says its "
                    "numbers are CPU numbers.")
    p.add_argument("--model", help="architecture (default: sdxl on a GPU, tiny-sdxl on the CPU)")
    p.add_argument("--resolution", type=int, help="pixels (default: 1024 on a GPU, 128 on the CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--fp8-base", action="store_true", help="frozen UNet weights in fp8 e4m3 after LoRA injection (train.fp8_base)")
    p.add_argument("--blocks-to-swap", type=int, default=0, metavar="N",
                   help="frozen weights of the N largest UNet blocks in pinned host memory, copied in ahead of use "
                        "(train.blocks_to_swap; needs --gradient-checkpointing; sdxl has 87 blocks)")
    p.add_argument("--matrix", action="store_true",
                   help="the issue's grid instead of one case: resolution 1024/512 x batch 1/4 x rank 16/64 with checkpointing, "
                        "plus 1024/1/16 without checkpointing and with an fp8 base (CPU: tiny-sdxl at 64/32 px, batch 1/2, "
                        "rank 4/8); --model, --resolution, --batch, --rank and the memory flags do not apply")
    p.add_argument("--loss-check", type=int, metavar="STEPS",
                   help="train STEPS steps on both paths from the same start with torch.optim.AdamW and compare the loss "
                        "curves, with the base in the model dtype and in fp8 (--model/--resolution/--batch/--rank/"
                        "--gradient-checkpointing apply); exit 1 when they differ by more than the tolerance. "
                        "Without --matrix, no step timing")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the loss check")
    p.add_argument("--out", help="write the environment, rows and loss checks as JSON here (default with --matrix or "
                                 "--loss-check: benchmarks/results/<device>-<date>-step.json or -loss.json)")
    p.set_defaults(run=cmd_bench)
    p = subparsers.add_parser(
        "memory", help="predict a config's peak GPU memory per training step, without a GPU",
        description="Runs the config's training step on the meta device (no weights loaded, seconds on a CPU) and "
                    "prints its peak GPU memory: frozen weights, LoRA and gradients, optimizer states, activations.")
    p.add_argument("config", help="path to the TOML config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key; repeatable")
    p.add_argument("--modes", action="store_true", help="every memory mode: bf16 or fp8 bases, with and without gradient "
                                                         "checkpointing, and with checkpointing and every block swapped")
    p.add_argument("--vram", type=float, metavar="GIB",
                   help="the mode train.memory = auto would choose on a device with GIB free, and its prediction")
    p.set_defaults(run=cmd_memory)


def cmd_bench(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    one = bench.Case(args.model or ("sdxl" if cuda else "tiny-sdxl"), args.resolution or (1024 if cuda else 128),
                     args.batch, args.rank, args.fp8_base, args.gradient_checkpointing, args.blocks_to_swap)
    note = None if cuda else "no CUDA GPU: these are CPU numbers at a tiny size, a smoke test, not the engine's GPU speed"
    if note:
        print(note, flush=True)
    out = args.out
    if out is None and (args.matrix or args.loss_check):
        kind = "step" if args.matrix else "loss"
        out = harness.results_dir() / f"{harness.device_slug()}-{datetime.date.today().isoformat()}-{kind}.json"
    env = dict(harness.environment(), driver=bench.driver_version(), note=note, steps=args.steps, warmup=args.warmup,
               timing="median wall-clock seconds of the timed steps, synchronised before and after each",
               flops="counted by FlopCounterMode on the reference path of each case, recomputation included; both rows' MFU use it")
    result = dict(env=env, rows=[], loss_checks=[])

    def save() -> None:  # after every case: a run cut short still leaves what it measured
        if out:
            write_bytes_atomic(out, (json.dumps(result, indent=1) + "\n").encode())

    cases = bench.matrix(cuda) if args.matrix else [] if args.loss_check else [one]
    for case in cases:
        rows = bench.run_case(case, args.steps, args.warmup, device, dtype, harness.ceiling()[0])
        print(bench.describe(rows), flush=True)
        result["rows"] += bench.as_dicts(rows)
        save()
    if args.loss_check:
        for fp8_base in (False, True):
            case = dataclasses.replace(one, fp8_base=fp8_base)
            check = bench.loss_check(case, args.loss_check, args.lr, device, dtype)
            print(bench.describe_loss(check), flush=True)
            result["loss_checks"] += bench.as_dicts([check])
            save()
    if out:
        print(f"results -> {out}")
    return 1 if any(not c["passed"] for c in result["loss_checks"]) else 0


def cmd_memory(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    for prediction in memtrace.memory_modes(cfg) if args.modes else [] if args.vram is not None else [memtrace.predict(cfg)]:
        print(prediction.describe(), flush=True)
    if args.vram is not None:
        if not 0 < args.vram < math.inf:
            raise ConfigError(f"--vram {args.vram}: must be a number of GiB above 0")
        _, chosen = memplan.plan(cfg, args.vram)
        print(chosen.describe())
        print(memplan.describe(chosen, args.vram))
    print("predicted on the meta device, not measured: compare with torch.cuda.max_memory_allocated; the CUDA "
          "context and the allocator's fragmentation come on top (see engine/memory/memtrace.py)")
    return 0
