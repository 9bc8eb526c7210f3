"""`gesso convert`, `gesso merge` and `gesso resize`, registered on cli.py's subparsers by add_parsers.

Parsing only: each command hands plain values to engine/lora/tools.py's convert_lora, merge_lora and resize_lora,
the functions a host program calls, and prints what they did. Input errors are one line on stderr and exit code 2.
"""
import argparse
import sys

from gesso.engine.lora import tools as lora_tools

MODEL_HELP = ("architecture the LoRA is for: a built-in name (sdxl, sd15, sd21, tiny-sdxl, ...) or a checkpoint "
              "(default: the model the file's ss_sd_model_name names, else its ss_base_model_version or "
              "modelspec.architecture, else its key names)")


def add_parsers(subparsers) -> None:
    c = subparsers.add_parser("convert", help="rewrite a LoRA in the kohya or the diffusers layout",
                              description="Read a kohya/A1111, diffusers/PEFT or ComfyUI LoRA and write it in the kohya "
                                          "layout (ComfyUI, AUTOMATIC1111/Forge, diffusers) or in diffusers' own layout.")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--to", required=True, choices=["kohya", "diffusers"])
    c.add_argument("--model", help=MODEL_HELP)
    c.add_argument("--dtype", choices=sorted(lora_tools.DTYPES), help="tensor dtype of the output (default: the input's)")
    c.set_defaults(run=cmd_convert)

    m = subparsers.add_parser("merge", help="bake LoRA files into a single-file checkpoint",
                              description="Write CHECKPOINT with each LORA added at its weight (default 1), "
                                          "in the checkpoint's own keys, dtypes and metadata.")
    m.add_argument("checkpoint", help="single-file checkpoint (.safetensors or .ckpt)")
    m.add_argument("loras", nargs="+", metavar="LORA[:WEIGHT]", help="LoRA files with optional weights, then OUT")
    m.set_defaults(run=cmd_merge)

    r = subparsers.add_parser("resize", help="shrink a LoRA's rank by SVD",
                              description="Cut each module to a rank, or to the fewest ranks that keep a fraction of "
                                          "its update's Frobenius norm; prints what each module keeps.")
    r.add_argument("input")
    r.add_argument("output")
    size = r.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="new rank of every module (modules of lower rank stay as they are)")
    size.add_argument("--energy", type=float, help="fraction in (0, 1] of each module's Frobenius norm to keep, e.g. 0.95")
    r.add_argument("--model", help=MODEL_HELP)
    r.add_argument("--verbose", action="store_true", help="one line per module")
    r.set_defaults(run=cmd_resize)


def cmd_convert(args: argparse.Namespace) -> int:
    out = lora_tools.convert_lora(args.input, args.output, to=args.to, model=args.model, dtype=args.dtype)
    cfg = lora_tools.model_config(args.input, args.model)
    print(f"{out}: {lora_tools.module_count(out)} modules, {args.to} layout ({cfg.name} architecture)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    if len(args.loras) < 2:
        print("error: merge needs CHECKPOINT, at least one LORA[:WEIGHT] and OUT", file=sys.stderr)
        return 2
    *specs, out = args.loras
    loras = [lora_tools.parse_lora_arg(s) for s in specs]
    counts = lora_tools.merge_lora(args.checkpoint, loras, out, progress=True)
    for (path, weight), n in zip(loras, counts.values()):
        print(f"merged {path} x {weight:g}: {n} modules")
    print(f"saved {out}")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    report = lora_tools.resize_lora(args.input, args.output, rank=args.rank, energy=args.energy, model=args.model,
                                   progress=True)
    if args.verbose:
        for r in report:
            print(f"{r.name}: rank {r.rank_before} -> {r.rank_after}, retained {r.retained:.4f}")
    print(f"{args.output}: {lora_tools.summary(report)}")
    return 0
