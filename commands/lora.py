"""`gesso convert`, `gesso merge` and `gesso resize`, registered on cli.py's subparsers by add_parsers.

Parsing only: each command resolves the model architecture once and hands plain values to engine.lora_convert
and engine.lora_tools. Input errors are one line on stderr and exit code 2.
"""
import argparse
import sys
from pathlib import Path

import torch

from gesso import models
from gesso.engine.lora import formats as lora_convert
from gesso.engine.lora import tools as lora_tools
from gesso.engine.lora.files import LoRAFileError, read_lora, save_lora

MODEL_HELP = ("architecture the LoRA is for: a built-in name (sdxl, sd15, sd21, tiny-sdxl, ...) or a checkpoint "
              "(default: from the file's ss_base_model_version, else from its key names)")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def add_parsers(subparsers) -> None:
    c = subparsers.add_parser("convert", help="rewrite a LoRA in the kohya or the diffusers layout",
                              description="Read a kohya/A1111, diffusers/PEFT or ComfyUI LoRA and write it in the kohya "
                                          "layout (ComfyUI, AUTOMATIC1111/Forge, diffusers) or in diffusers' own layout.")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--to", required=True, choices=["kohya", "diffusers"])
    c.add_argument("--model", help=MODEL_HELP)
    c.add_argument("--dtype", choices=sorted(DTYPES), help="tensor dtype of the output (default: the input's)")
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


def model_config(path: Path, model: str | None):
    """The ModelConfig a LoRA file is read against: --model, else its metadata, else its key names."""
    if model:
        if model in models.configs.REGISTRY:
            return models.configs.get(model)
        return models.open_checkpoint(model).config
    tensors, metadata = read_lora(path)
    version = metadata.get("ss_base_model_version", "")
    keys = " ".join(tensors)
    if version.startswith("sdxl_") or any(s in keys for s in ("lora_te2_", "text_encoder_2.", "input_blocks", "add_embedding")):
        return models.configs.SDXL_BASE
    if version.startswith("sd_v2"):
        return models.configs.SD21
    if version.startswith("sd_v1") or any(s in keys for s in ("down_blocks_0_attentions", "down_blocks.0.attentions")):
        return models.configs.SD15
    raise LoRAFileError(f"{path}: cannot tell which model this LoRA is for; pass --model")


def read_placed(path: Path, model: str | None) -> tuple[lora_convert.LoRA, object]:
    cfg = model_config(path, model)
    return lora_convert.require_placed(path, lora_convert.read(path, cfg)), cfg


def cmd_convert(args: argparse.Namespace) -> int:
    src, out = Path(args.input), Path(args.output)
    lo, cfg = read_placed(src, args.model)
    if args.dtype:
        lo.modules = {n: lora_convert.Module(m.down.to(DTYPES[args.dtype]), m.up.to(DTYPES[args.dtype]), m.alpha)
                      for n, m in lo.modules.items()}
    if args.to == "kohya":
        save_lora(out, lora_convert.to_kohya(lo), lora_convert.kohya_metadata(lo, cfg.family, out.stem))
    else:
        from safetensors.torch import save_file

        from gesso.engine.io import write_atomic

        write_atomic(out, lambda tmp: save_file(lora_convert.to_diffusers(lo, cfg), tmp, metadata={"format": "pt"}))
    print(f"{out}: {len(lo.modules)} modules, {args.to} layout ({cfg.name} architecture)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    if len(args.loras) < 2:
        print("error: merge needs CHECKPOINT, at least one LORA[:WEIGHT] and OUT", file=sys.stderr)
        return 2
    *specs, out = args.loras
    loras = [lora_tools.parse_lora_arg(s) for s in specs]
    if Path(out).suffix != ".safetensors":
        raise LoRAFileError(f"{out}: the merged checkpoint is written as .safetensors; name it so")
    counts = lora_tools.merge(args.checkpoint, loras, out)
    for (path, weight), n in zip(loras, counts.values()):
        print(f"merged {path} x {weight:g}: {n} modules")
    print(f"saved {out}")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    src, out = Path(args.input), Path(args.output)
    lo, cfg = read_placed(src, args.model)
    try:
        resized, report = lora_tools.resize(lo, rank=args.rank, energy=args.energy)
    except ValueError as e:
        raise LoRAFileError(f"{src}: {e}") from None
    if args.verbose:
        for r in report:
            print(f"{r.name}: rank {r.rank_before} -> {r.rank_after}, retained {r.retained:.4f}")
    save_lora(out, lora_convert.to_kohya(resized), lora_convert.kohya_metadata(resized, cfg.family, out.stem))
    print(f"{out}: {lora_tools.summary(report)}")
    return 0
