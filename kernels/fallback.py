"""A Triton failure never loses a run: the kernel gives way to its PyTorch reference, for the rest of the process.

Any Triton error (`triton.errors.TritonError`: CompilationError, PTXASError, OutOfResources, ...) raised when a
kernel compiles or launches switches that kernel, for that dtype and shape class (`cls`, e.g. "bfloat16 x,
float8_e4m3fn W, rank<=16"),
to its reference, with one warning line naming the kernel, the GPU and the error. A launch fails before it writes
anything, so the call is answered by the reference and nothing of the step is lost; a failure in a backward pass
is answered by the reference's gradients of the same forward.

Verdicts ("triton" or "reference", and why) are kept per GPU, driver, Triton and Gesso version in
`<cache>/gesso/kernel-verdicts.json` (`$XDG_CACHE_HOME`, else ~/.cache), so the next run starts on the right path.
The file is JSON written atomically; an unreadable or malformed one counts as absent, and one that cannot be written
(a read-only home) leaves the verdicts in memory with one note. Only `auto` dispatch is
guarded: `GESSO_KERNELS=triton` forces the kernels and lets their errors raise (the GPU parity tests need them).
"""
import datetime
import hashlib
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import triton
from tqdm import tqdm
from triton.errors import TritonError

from gesso.kernels import device as gpus
from gesso.kernels.dispatch import kernel_mode

VERDICTS_FILE = "kernel-verdicts.json"
USES = ("triton", "reference")
_stores: dict = {}  # GPU index -> Verdicts of this process


def cache_dir() -> Path:
    """Gesso's per-user cache folder: $XDG_CACHE_HOME/gesso, else ~/.cache/gesso."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gesso"


def driver_version() -> str:
    """The NVIDIA kernel module's version (Linux), else the CUDA driver API version torch reports."""
    try:
        line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        return next(word for word in line.split() if word[:1].isdigit() and word.count(".") >= 1)
    except (OSError, IndexError, StopIteration):
        return f"cuda-driver-api-{torch._C._cuda_getDriverVersion()}" if torch.cuda.is_available() else "none"


def _kernel_sources() -> str:
    """A short hash of the kernels' sources: an edited kernel is judged again, whatever the version says."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def gesso_version() -> str:
    return getattr(importlib.import_module("gesso"), "__version__", "?")


def device_key(gpu: gpus.GPU) -> str:
    return (f"{gpu.name} sm_{gpu.arch} | driver {driver_version()} | triton {triton.__version__} | "
            f"gesso {gesso_version()} ({_kernel_sources()})")


class Verdicts:
    """The verdicts of one GPU: {op: {cls: {"use": "triton" | "reference", "why": str, "date": str}}}."""

    def __init__(self, gpu: gpus.GPU, path: Path):
        self.gpu, self.path, self.key = gpu, path, device_key(gpu)
        self.ops = read_verdicts(path).get(self.key, {})
        self.found = bool(self.ops)  # an earlier run on this GPU, driver, Triton and Gesso left verdicts
        self.unwritable = False

    def use(self, op: str, cls: str) -> str | None:
        return self.ops.get(op, {}).get(cls, {}).get("use")

    def record(self, op: str, cls: str, use: str, why: str) -> None:
        assert use in USES, use
        self.ops.setdefault(op, {})[cls] = {"use": use, "why": why, "date": datetime.date.today().isoformat()}
        everything = read_verdicts(self.path)  # another process may have written other GPUs' verdicts meanwhile
        everything[self.key] = self.ops
        try:
            write_atomic(self.path, json.dumps(everything, indent=1, sort_keys=True) + "\n")
        except OSError as e:
            if not self.unwritable:
                tqdm.write(f"gesso: note: cannot keep kernel verdicts in {self.path} ({e.strerror or e}); "
                           "they hold for this run only", file=sys.stderr)
            self.unwritable = True


def read_verdicts(path: Path) -> dict:
    """{device key: {op: {cls: verdict}}}; {} when the file is missing, unreadable or not such a mapping."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    valid = isinstance(data, dict) and all(
        isinstance(ops, dict) and all(isinstance(classes, dict) and all(
            isinstance(v, dict) and v.get("use") in USES and isinstance(v.get("why"), str) for v in classes.values())
            for classes in ops.values()) for ops in data.values())
    return data if valid else {}


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: readers see old or new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def verdicts(device: torch.device) -> Verdicts | None:
    """This process's verdicts for a CUDA device (loaded at first use), None for any other device."""
    if device.type != "cuda":
        return None
    gpu = gpus.gpu(device)
    if gpu.index not in _stores:
        _stores[gpu.index] = Verdicts(gpu, cache_dir() / VERDICTS_FILE)
    return _stores[gpu.index]


def gpu_name(device: torch.device) -> str:
    return gpus.gpu(device).name if device.type == "cuda" else device.type.upper()


_switched: set = set()  # (device, op, cls) switched to the reference in this process
given_way: list = []  # {"op", "cls", "device", "why"} of every switch in this process, in order (benchmark rows cite them)


def switched(op: str, cls: str, device: torch.device) -> bool:
    """True when `op` at `cls` runs the reference on this device: it failed in this process, or a verdict says so."""
    if (str(device), op, cls) in _switched:
        return True
    store = verdicts(device)
    return store is not None and store.use(op, cls) == "reference"


def give_way(op: str, cls: str, device: torch.device, why: str) -> None:
    """Switch `op` at `cls` to its reference on this device from now on: one warning line, and the verdict kept."""
    _switched.add((str(device), op, cls))
    given_way.append(dict(op=op, cls=cls, device=gpu_name(device), why=why))
    # through tqdm, which keeps a progress bar on the terminal (training's, the self-check's) whole
    tqdm.write(f"gesso: warning: Triton kernel {op} ({cls}) cannot run on {gpu_name(device)}: {why}; "
               f"using its PyTorch reference from now on", file=sys.stderr)
    store = verdicts(device)
    if store is not None:
        store.record(op, cls, "reference", why)


def describe(error: BaseException) -> str:
    """`Type: the telling line` of an error, at most 300 characters: the compiler's message (a CompilationError's
    first line is only a position; one raised in a called @triton.jit function carries it on its cause), ptxas's own
    `error` line, else the first line."""
    cause = error
    while cause is not None and not getattr(cause, "error_message", None):
        cause = cause.__cause__
    lines = [line.strip() for line in str(getattr(cause, "error_message", None) or error).splitlines() if line.strip()]
    telling = next((line for line in lines[1:] if "error" in line.lower()), lines[0] if lines else "")
    return f"{type(error).__name__}: {telling}"[:300]


def run(op: str, cls: str, device: torch.device, kernel, reference):
    """kernel() where it works, else reference(). Under `auto`, `op` at `cls` switched to the reference (`switched`)
    calls reference() alone, and a Triton error switches it (`give_way`) and answers this call with reference();
    a forced mode calls kernel() alone."""
    if kernel_mode() != "auto":
        return kernel()
    if switched(op, cls, device):
        return reference()
    try:
        return kernel()
    except TritonError as e:
        give_way(op, cls, device, describe(e))
    return reference()
