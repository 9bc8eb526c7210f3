"""`gesso doctor [CONFIG]`: what this machine gives Gesso, told plainly.

The device (name, compute capability, per-block shared memory, bf16 and fp8 support) or the plain fact that there is
none; the torch, CUDA, Triton, driver and Gesso versions; the dispatch mode, each kernel's verdict on this GPU
(checked now against its reference when it has none: kernels/selfcheck.py) and where the verdicts, Triton's compiled
kernels and the autotuner's results are kept; and with a config, the precision it resolves to and its memory plan.
"""
import argparse
import platform
import sys

import torch
import triton
from triton import knobs

from gesso.engine.config.load import load_config
from gesso.engine.memory import memplan, memtrace
from gesso.errors import ConfigError
from gesso.kernels import device as gpus
from gesso.kernels import fallback, selfcheck
from gesso.kernels.dispatch import ENV_VAR, kernel_mode

NO_GPU = "no GPU: kernels run only through the interpreter in tests"


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="the device, versions, kernel verdicts, caches and a config's memory plan",
                              description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("config", nargs="?", help="a TOML config: its precision on this device and its memory plan")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key; repeatable")
    p.set_defaults(run=cmd_doctor)


def cmd_doctor(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    cfg = load_config(args.config, args.set) if args.config else None  # a bad config is one line before anything runs
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    for line in describe_device(device) + versions(cuda) + kernels(device, cfg) + caches() + plan(cfg, device):
        print(line, file=out)
    return 0


def describe_device(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return [f"device: CPU ({platform.machine()}); {NO_GPU}"]
    gpu = gpus.gpu(device)
    return [f"device: {gpu.name}, compute capability {gpu.capability[0]}.{gpu.capability[1]} (sm_{gpu.arch}), "
            f"{gpu.memory_gib:.1f} GiB",
            f"shared memory per block: {gpu.shared_memory} B ({gpu.shared_memory / 1024:.0f} KiB); "
            f"bf16: {'yes' if gpu.bf16 else 'no'}; fp8 (e4m3) weights: {'yes' if gpu.fp8 else 'no, sm_89 and up'}"]


def versions(cuda: bool) -> list[str]:
    driver = fallback.driver_version() if cuda else "none"
    return [f"versions: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"triton {triton.__version__}, driver {driver}, gesso {fallback.gesso_version()}"]


def kernels(device: torch.device, cfg) -> list[str]:
    mode = kernel_mode()
    lines = [f"kernels: {ENV_VAR}={mode}" + ("" if mode == "auto" else " (forced: verdicts and the self-check do not apply)")]
    if device.type != "cuda":
        return lines
    train = cfg.train if cfg is not None else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(gpus.precision(train.mixed_precision if train else "auto", device),
                                                                 torch.float32)
    selfcheck.preflight(device, dtype, fp8_base=bool(train and train.fp8_base), rank=cfg.network.rank if cfg else 16,
                        adamw8bit=train is None or train.optimizer == "adamw8bit", head_dims=(64, 80, 160))
    store = fallback.verdicts(device)
    for op, classes in sorted(store.ops.items()):
        for cls, v in sorted(classes.items()):
            lines.append(f"  {op} ({cls}): {v['use']} ({v['why']})")
    if not store.ops:
        lines.append("  no kernel runs here under auto dispatch (fp32 matmuls take cuBLAS and SDPA)")
    return lines


def caches() -> list[str]:
    return [f"verdicts: {fallback.cache_dir() / fallback.VERDICTS_FILE}",
            f"Triton's compiled kernels and autotuner results: {knobs.cache.dir} (kept across runs)"]


def plan(cfg, device: torch.device) -> list[str]:
    if cfg is None:
        return ["memory plan: give a config (gesso doctor CONFIG.toml)"]
    precision = gpus.precision(cfg.train.mixed_precision, device)
    lines = [f"config: mixed_precision = {cfg.train.mixed_precision} -> {precision} here"]
    lines.append(f"memory plan: {memtrace.predict(cfg).describe()}")
    if device.type == "cuda":
        free = memplan.free_gib(device)
        try:
            chosen, peak = memplan.plan(cfg, free)
        except ConfigError as e:  # no mode fits this GPU's free memory: the plan's answer, not doctor's failure
            lines.append(str(e))
        else:
            lines.append(memplan.describe(peak, free))
    else:
        lines.append("(predicted for a GPU, in bf16 where the config says auto; this machine has none)")
    return lines
