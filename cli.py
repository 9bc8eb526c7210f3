"""Gesso's command line: `python cli.py COMMAND ...`, also installed as `gesso`.

This is the edge: it parses arguments, builds the typed config once, and turns the engine's input
errors into one-line messages with a non-zero exit instead of tracebacks.
"""
import argparse
import os
import sys
from pathlib import Path

CONFIG_HELP = "Every config key, its default and meaning: README.md, section 'Config reference'."


def cmd_train(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.train import train

    cfg = load_config(args.config, args.set)
    output_dir = Path(args.output_dir or args.resume or cfg.output.dir or Path("output") / cfg.output.name)
    result = train(cfg, output_dir, resume=args.resume)
    print(f"saved {result.final} ({len(result.epoch_files)} epoch files, metrics in {output_dir / 'metrics.jsonl'})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from models.inspect import inspect_main

    return inspect_main(args.path)


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    import torch

    from engine import bench

    cuda = torch.cuda.is_available()
    model = args.model or ("sdxl" if cuda else "tiny-sdxl")
    resolution = args.resolution or (1024 if cuda else 128)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = None
    if cuda:
        from benchmarks.harness import CEILINGS

        name = torch.cuda.get_device_name(device)
        peak = next((tflops for key, (tflops, _) in CEILINGS.items() if key in name), None)
    else:
        print("no CUDA GPU: these are CPU numbers at a tiny size, a smoke test, not the engine's GPU speed", flush=True)
    rows = [bench.run_path(path, model, resolution, args.batch, args.rank, args.steps, args.warmup, device, dtype,
                           args.gradient_checkpointing, peak) for path in ("kernels", "reference")]
    print(bench.describe(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(bench.as_dicts(rows), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gesso", description="Fast LoRA training for SDXL and SD 1.5.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a LoRA from a TOML config", description=f"Train a LoRA from a TOML config. {CONFIG_HELP}")
    p.add_argument("config", help="path to the TOML config (see examples/demo.toml)")
    p.add_argument("--output-dir", help="where the LoRA files and metrics.jsonl go (default: output.dir, else output/<output.name>)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key; repeatable")
    p.add_argument("--resume", metavar="DIR", help="go on from the state.pt an earlier (interrupted) run left in DIR; "
                                                   "the output goes to DIR unless --output-dir says otherwise")
    p.set_defaults(run=cmd_train)
    p = sub.add_parser("inspect", help="what a checkpoint or LoRA file holds (reads only the header)",
                       description="Detected architecture, parameter counts and dtypes, missing or unexpected keys; for a LoRA, "
                                   "rank, alpha, targets and metadata. Exit 1 when keys do not match, 2 when unreadable.")
    p.add_argument("path", help="a .safetensors/.ckpt file, a diffusers folder or a cached Hub repo id")
    p.set_defaults(run=cmd_inspect)
    p = sub.add_parser("bench", help="time a LoRA training step: engine kernels vs the PyTorch reference path",
                       description="Seconds per step, images/s, MFU and peak GPU memory of LoRA training on cached-latent shapes "
                                   "(random weights, real shapes), for the engine's kernels and the reference path in one process. "
                                   "Without a GPU it runs tiny-sdxl at 128 px and says its numbers are CPU numbers.")
    p.add_argument("--model", help="architecture (default: sdxl on a GPU, tiny-sdxl on the CPU)")
    p.add_argument("--resolution", type=int, help="pixels (default: 1024 on a GPU, 128 on the CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", help="also write the rows as JSON here")
    p.set_defaults(run=cmd_bench)
    from engine.sample_cli import add_parsers; add_parsers(sub)  # noqa: E702  `sample` and `grid`
    from engine.lora_cli import add_parsers as lora_parsers; lora_parsers(sub)  # noqa: E702  `convert`, `merge`, `resize`
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as other CLI tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
