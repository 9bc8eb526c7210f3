"""Gesso's command line: `python cli.py COMMAND ...`, also installed as `gesso`.

This is the edge: it parses arguments and hands each command to its handler in `commands/`, which builds
the typed config once and passes plain values inward. Bad input (any `GessoError`) becomes one line after
`error: ` and exit code 2 instead of a traceback.
"""
import argparse
import os
import sys

from gesso.commands import inspect, lora, measure, sample, train
from gesso.errors import GessoError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gesso", description="Fast LoRA training for SDXL and SD 1.5.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (train, inspect, measure, sample, lora):  # the order `gesso --help` lists them in
        command.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except GessoError as e:
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
