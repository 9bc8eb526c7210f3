"""`gesso caption DIR`: a caption file beside each image, from BLIP or a WD booru tagger; registered by add_parsers.

Parsing only: engine/data/captioners.py finds the model (a folder, or a Hub id through huggingface_hub's cache),
walks the folder and writes the files.
"""
import argparse
from pathlib import Path

from gesso.engine.data.captioners import DEFAULT_MODELS, CaptionError, TagOptions, caption_folder, open_captioner


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("caption", help="write a caption beside each image (BLIP sentences or WD tagger tags)",
                              description="Caption every image under DIR (N_name sub-folders included); a caption "
                                          "that exists is kept unless --overwrite.")
    p.add_argument("dir", help="folder of images")
    p.add_argument("--captioner", choices=["blip", "tagger"], default="tagger",
                   help="blip: one sentence (transformers); tagger: booru tags (onnxruntime, pip install 'gesso[caption]')")
    p.add_argument("--model", help=f"Hub id or local folder (default {DEFAULT_MODELS['tagger']} for the tagger, "
                                   f"{DEFAULT_MODELS['blip']} for blip)")
    p.add_argument("--prefix", default="", help="prepended to every caption, e.g. your trigger word")
    p.add_argument("--threshold", type=float, default=0.35, help="tagger: general tags scored at least this (default 0.35)")
    p.add_argument("--character-threshold", type=float, help="tagger: character tags scored at least this (default --threshold)")
    p.add_argument("--undesired-tags", default="", help="tagger: comma-separated tags never written")
    p.add_argument("--replace-underscores", action="store_true", help="tagger: long_hair -> long hair (not in kaomoji like ^_^)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--skip-existing", dest="overwrite", action="store_false", help="keep captions that exist (default)")
    existing.add_argument("--overwrite", dest="overwrite", action="store_true", help="replace captions that exist")
    p.add_argument("--batch-size", type=int, default=1, help="images per model call (default 1)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--caption-extension", default=".txt", help="extension of the caption files (default .txt)")
    p.set_defaults(run=cmd_caption, overwrite=False)


def _check(args: argparse.Namespace) -> None:
    for name in ("threshold", "character_threshold"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:  # nan fails both comparisons
            raise CaptionError(f"--{name.replace('_', '-')} {value}: must be within [0, 1]")
    if args.batch_size < 1:
        raise CaptionError(f"--batch-size {args.batch_size}: must be 1 or more")
    if args.device not in ("auto", "cpu", "cuda"):
        raise CaptionError(f"--device {args.device}: expected auto, cpu or cuda")
    if not args.caption_extension.startswith(".") or len(args.caption_extension) < 2 or "/" in args.caption_extension:
        raise CaptionError(f"--caption-extension {args.caption_extension!r}: expected an extension such as .txt")


def cmd_caption(args: argparse.Namespace) -> int:
    _check(args)
    root = Path(args.dir)
    if not root.is_dir():
        raise CaptionError(f"{root}: no such folder")
    opts = TagOptions(args.threshold, args.character_threshold,
                      tuple(t.strip() for t in args.undesired_tags.split(",") if t.strip()), args.replace_underscores)
    captioner = open_captioner(args.captioner, args.model, args.device, opts)
    summary = caption_folder(root, captioner, args.prefix, args.overwrite, args.batch_size, args.caption_extension)
    print(summary.describe(), flush=True)
    return 0
