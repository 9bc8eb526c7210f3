"""Gesso's command line: `python cli.py COMMAND ...`, also installed as `gesso`.

This is the edge: it parses arguments and hands each command to its handler in `commands/`, which builds
the typed config once and passes plain values inward. Bad input (any `GessoError`) becomes one line after
`error: ` and exit code 2 instead of a traceback. Ctrl-C (SIGINT) and SIGTERM end any command with one line
and exit code 130 or 143 (128 + the signal, as shells report it); `train` stops at a step boundary
(commands/train.py), and a file being written is abandoned whole (engine/io.py).
"""
import argparse
import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_at_once(signum: int, frame) -> None:
    """A signal while Python loads torch (seconds, before `main`): nothing has started, so nothing is lost by leaving
    at once, whereas an interrupt raised inside an extension module's import comes out as an ImportError's traceback."""
    os.write(2, f"interrupted ({signal.Signals(signum).name})\n".encode())
    os._exit(128 + signum)


def take_signals(handler) -> dict:
    """`handler` for SIGINT and SIGTERM, except one that is ignored (a shell starts a background job with SIGINT
    ignored, and Python leaves it so); the handlers replaced, to put back. Only the main thread may set them:
    a host calling `main` from another thread keeps its own."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}


if __name__ == "__main__":
    take_signals(exit_at_once)

from gesso.commands import caption, doctor, inspect, lora, measure, sample, serve, train  # noqa: E402 (after the handlers above)
from gesso.errors import GessoError  # noqa: E402


class Interrupt:
    """SIGINT and SIGTERM as KeyboardInterrupt, carrying the signal for the exit code (a SIGTERM takes the same clean
    way out as Ctrl-C). The first one is remembered: one that lands inside a lazy import can surface as another
    exception, which is then still an interruption, not a traceback."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum: int, frame) -> None:
        self.signum = self.signum or signum
        raise KeyboardInterrupt(signum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gesso", description="Fast LoRA training for SDXL and SD 1.5.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (train, caption, inspect, measure, sample, lora, doctor, serve):  # the order `gesso --help` lists them in
        command.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupt = Interrupt()
    previous = take_signals(interrupt)
    try:
        return args.run(args)
    except GessoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Python's own Ctrl-C handler (a host's, around an in-process call) puts no signal in it
        return interrupted(e.args[0] if e.args and e.args[0] in STOP_SIGNALS else signal.SIGINT)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as other CLI tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception:
        if interrupt.signum is None:
            raise
        return interrupted(interrupt.signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def interrupted(signum: int) -> int:
    print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
