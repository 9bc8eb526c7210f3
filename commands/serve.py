"""`gesso serve`: the local training service, an HTTP job API (serve/app.py), from the `serve` extra.

It listens on 127.0.0.1 unless told otherwise; an address other machines can reach needs a token (--token or
GESSO_SERVE_TOKEN), which every request must then carry. Ctrl-C or SIGTERM stops it: running jobs stop at their next
step boundary with their state saved, and the next start resumes them.
"""
import argparse
import importlib.util
import ipaddress
import os
from pathlib import Path

from gesso.errors import ConfigError

TOKEN_ENV = "GESSO_SERVE_TOKEN"
LOCAL_NAMES = ("localhost",)


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the local training service: an HTTP job API with a queue and live events",
                              description="A persistent queue of training jobs behind an HTTP API (README, 'Training "
                                          "service'); needs the serve extra: pip install -e \".[serve]\".")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                                                       "any other needs --token)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: a free one, printed at start)")
    p.add_argument("--data", default="gesso-serve", metavar="DIR",
                   help="the server's data folder: the queue (jobs.db), each job's output (jobs/<id>/), the dataset cache "
                        "(default ./gesso-serve); the server writes nowhere else")
    p.add_argument("--token", help=f"a secret every request must send as 'Authorization: Bearer <token>' (default: ${TOKEN_ENV})")
    p.add_argument("--devices", default="auto", help="'cpu', or GPU indices such as 0,1: one job at a time on each "
                                                     "(default auto: every visible GPU, else the CPU)")
    p.add_argument("--demo", metavar="FILE.toml", help="the config the page's 'demo' choice submits, its paths relative to "
                                                     "its folder (default: examples/demo.toml of a clone)")
    p.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_local(args.host) and token is None:
        raise ConfigError(f"--host {args.host} can be reached from other machines: give --token (or {TOKEN_ENV}) so that "
                          "only clients holding it can train here")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: expected 0 to 65535")
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"gesso serve needs {' and '.join(missing)}: pip install -e \".[serve]\"")
    from gesso.serve.app import serve
    from gesso.serve.page import BUNDLED_DEMO
    from gesso.serve.runner import find_devices

    demo = Path(args.demo).resolve() if args.demo else BUNDLED_DEMO
    if args.demo and not demo.is_file():
        raise ConfigError(f"--demo {args.demo}: no such file")
    serve(args.host, args.port, Path(args.data), token, find_devices(args.devices), demo)
    return 0


def is_local(host: str) -> bool:
    """Whether `host` is reachable from this machine only: a loopback address or localhost."""
    if host in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
