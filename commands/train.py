"""`gesso train`: a LoRA from a TOML config, with the terminal progress bar."""
import argparse
from pathlib import Path

from gesso.engine.config import load_config
from gesso.engine.train import train

CONFIG_HELP = "Every config key, its default and meaning: README.md, section 'Config reference'."


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a LoRA from a TOML config",
                              description=f"Train a LoRA from a TOML config. {CONFIG_HELP}")
    p.add_argument("config", help="path to the TOML config (see examples/demo.toml)")
    p.add_argument("--output-dir", help="where the LoRA files and metrics.jsonl go (default: output.dir, else output/<output.name>)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key; repeatable")
    p.add_argument("--resume", metavar="DIR", help="go on from the state.pt an earlier (interrupted) run left in DIR; "
                                                   "the output goes to DIR unless --output-dir says otherwise")
    p.set_defaults(run=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    output_dir = Path(args.output_dir or args.resume or cfg.output.dir or Path("output") / cfg.output.name)
    result = train(cfg, output_dir, resume=args.resume)
    print(f"saved {result.final} ({len(result.epoch_files)} epoch files, metrics in {output_dir / 'metrics.jsonl'})")
    return 0
