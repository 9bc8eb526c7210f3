"""What every fault case asserts: the exit code, one `error: ...` line naming the file or key and no traceback,
and that every file present before the case is byte-identical and still loadable afterwards."""
import contextlib
import io
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gesso import cli
from gesso.engine.lora import formats
from gesso.engine.run.manifest import MANIFEST_FILE, read_manifest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "tests" / "data" / "demo.toml"
RANK = 4


def gesso_cli(*args, cwd=None, timeout=600, env=None, **kwargs) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` in a subprocess, one torch thread (the tests' machine may be loaded), text output."""
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def gesso_main(*args) -> subprocess.CompletedProcess:
    """`gesso.cli.main(ARGS)` in this process, its exit code and output as `gesso_cli` gives them: seconds faster than a
    subprocess (no torch import). An exception that escapes main (a traceback in a real run) fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return subprocess.CompletedProcess(["gesso", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str, code: int = 2) -> str:
    """Exit `code`, no traceback, exactly one stderr line starting `error: ` and naming each of `names`."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}: {out[-2000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one error line: {proc.stderr[-2000:]}"
    for name in names:
        assert str(name) in errors[0], f"{name!r} not named in {errors[0]!r}"
    return errors[0]


def snapshot(folder: Path) -> dict[Path, bytes]:
    """Every file under `folder` and its bytes."""
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def loadable(path: Path) -> None:
    """Raise if `path` does not load the way Gesso loads it."""
    if path.suffix == ".safetensors":
        load_file(path)
    elif path.suffix == ".pt":
        torch.load(path, map_location="cpu", weights_only=True)
    elif path.suffix == ".jsonl":
        [json.loads(line) for line in path.read_text().splitlines()]


def assert_unchanged(before: dict[Path, bytes]) -> None:
    """Each file of the snapshot is still there, byte-identical and loadable; the run's manifest may instead record the
    run that resumed it (a resume for more epochs is that run, rewritten before its first save): then it must still
    be a manifest of the same output name."""
    for path, data in before.items():
        assert path.is_file(), f"{path} is gone"
        if path.name == MANIFEST_FILE and path.read_bytes() != data:
            found = read_manifest(path.parent)
            assert found is not None and found["name"] == json.loads(data)["name"], f"{path} is no longer its run's manifest"
            continue
        assert path.read_bytes() == data, f"{path} changed"
        loadable(path)


def temp_litter(folder: Path) -> list[Path]:
    """Temporary files an atomic write leaves only when it is killed: `.<name>.<random>.tmp`."""
    return [p for p in Path(folder).rglob("*.tmp")]


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextmanager
def tmpfs(folder: Path, size: str = "64m"):
    """A tmpfs on `folder` (created), unmounted afterwards: a real disk to fill. Skips where mounting is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs ({proc.stderr.strip()}); the fsync-patched variant covers a full disk")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def leave_free(mount: Path, free: int) -> None:
    """Shrink the tmpfs on `mount` so that about `free` bytes (rounded to pages) are left for new data."""
    st = os.statvfs(mount)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    proc = _mount("-o", f"remount,size={used + free}", str(mount))
    assert proc.returncode == 0, proc.stderr


@contextmanager
def read_only(folder: Path):
    """`folder` as a read-only bind mount of itself (writes fail with EROFS even for root, who ignores
    permission bits). Skips where mounting is not permitted."""
    proc = _mount("--bind", str(folder), str(folder))
    if proc.returncode:
        pytest.skip(f"cannot bind-mount {folder} read-only ({proc.stderr.strip()}); root ignores chmod 0555")
    try:
        proc = _mount("-o", "remount,bind,ro", str(folder))
        assert proc.returncode == 0, proc.stderr
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def lora_tensors(cfg) -> dict[str, torch.Tensor]:
    """A rank-4 kohya module on every weight the layout places (UNet with LoCon convs, both text encoders)."""
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, target in formats.layout(cfg).targets.items():
        out, *fan_in = target.shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, *fan_in, generator=g) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, RANK, *[1] * (len(fan_in) - 1), generator=g) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    return tensors


# One interpreter imports gesso once and forks a child per run, which runs cli.main as `python cli.py train` does;
# a child is killed like any process. Only the imports (seconds, writing nothing) are shared: 20+ kills then fit in
# the time a test has. Loading the config once (argv: config, overrides) imports what its checks import on first use.
ZYGOTE = r"""
import json, os, sys
from gesso import cli
from gesso.engine.config.load import load_config
load_config(sys.argv[1], sys.argv[2:])
ended = {}
for line in sys.stdin:
    command, arg = line.split(" ", 1)
    if command == "run":
        argv, log = json.loads(arg)
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(out, 1)
                os.dup2(out, 2)
                code = cli.main(argv)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)
    else:
        pid = int(arg)
        if pid not in ended:
            done, status = os.waitpid(pid, os.WNOHANG if command == "poll" else 0)
            if done:
                ended[pid] = os.waitstatus_to_exitcode(status)
        print(ended.get(pid, "running"), flush=True)
"""


class Zygote:
    """The forking interpreter above: `run` starts `gesso ARGV` as a child (its output in a log file) and gives its pid;
    `poll` and `wait` give its exit code as os.waitstatus_to_exitcode does (-9 for kill -9)."""

    def __init__(self, cwd: Path, config: Path, sets: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(config), *sets], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"))

    def ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def run(self, argv: list[str], log: Path) -> int:
        return int(self.ask("run " + json.dumps([argv, str(log)])))

    def poll(self, pid: int) -> int | None:
        answer = self.ask(f"poll {pid}")
        return None if answer == "running" else int(answer)

    def wait(self, pid: int) -> int:
        return int(self.ask(f"wait {pid}"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
