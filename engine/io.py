"""Atomic file writes: a crash, Ctrl-C or full disk never leaves a half-written file under the final name.

Every file a run or a tool writes goes through here, but for the logs appended step by step (metrics.jsonl's
rows, TensorBoard's event files: engine/run/logs.py) and the run folder's lock (engine/run/rundir.py). A write that fails
for a reason the user can fix (full disk, read-only folder, a file where a folder should be) raises OutputError,
one line naming the path and what to do; the temporary file is removed and an earlier file of that name is left
as it was.
"""
import contextlib
import errno
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from gesso.errors import OutputError

# what temp_name makes, and what mkstemp made before it (8 of [a-z0-9_]): a killed run's leftovers, which the next
# run in that folder removes (engine/run/rundir.py); a user's own files never match
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
# Rust's io::Error, as safetensors' save_file reports it inside a SafetensorError: "... (os error 28)"
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temp file in the target's folder, give it the umask's permissions, fsync it,
    then rename it over `path`. Raises OutputError when the file cannot be written."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # the name is bound before the file exists (unlike mkstemp): an interrupt
            tmp = temp_name(path)  # never leaves a file the cleanup below misses
            try:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                break
            except FileExistsError:
                tmp = None  # another writer's temporary file: never ours to remove
        else:
            raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))
        write(tmp)
        with open(tmp, "rb") as f:
            # created 0600 while it is written; then the umask's bits, as any other program's file gets: a ComfyUI
            # or AUTOMATIC1111 running as another user (Docker) must be able to read it
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):  # the error that brought us here is the one to report
                os.unlink(tmp)
        cause = os_error(e)
        if cause is None:
            raise
        raise output_error(path, cause) from e


def temp_name(path: Path) -> str:
    """The temporary file a write of `path` goes through: `.<name>.<8 random hex digits>.tmp` beside it."""
    return str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def current_umask() -> int:
    """The process umask. Linux shows it in /proc/self/status; elsewhere reading it means setting it, which
    races with other threads creating files, so the fallback sets the strict 077 for that instant."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def os_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: `e` itself, the one a library raised its own error from (torch.save
    into a Python file raises RuntimeError while handling it), or the one named in safetensors' Rust message."""
    if isinstance(e, OSError):
        return e
    if not isinstance(e, Exception):  # KeyboardInterrupt and the like go on as they are
        return None
    for inner in (e.__cause__, e.__context__):
        if isinstance(inner, OSError):
            return inner
    found = RUST_OS_ERROR.search(str(e))
    return OSError(int(found[1]), os.strerror(int(found[1]))) if found else None


def output_error(path: Path, e: OSError) -> OutputError:
    """One line: the path, why it cannot be written, and what to do."""
    code = e.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on the device (or over quota); free some space or choose another output folder"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = f"the folder is read-only ({e.strerror}); make it writable or choose another output folder"
    elif code in (errno.ENOTDIR, errno.EEXIST) and (blocker := _file_in_the_way(path)) is not None:
        why = f"{blocker} is a file, not a folder; remove it or choose another output folder"
    elif code == errno.EISDIR:
        why = "a folder of that name is in the way; remove it or choose another name"
    else:
        why = f"cannot write it ({e.strerror or e})"
    return OutputError(f"{path}: {why}; earlier files are unchanged")


def _file_in_the_way(path: Path) -> Path | None:
    """The path itself or the nearest parent that exists and is not a folder."""
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):  # a parent we may not look into: nothing to name
            if p.exists() or p.is_symlink():
                return None if p.is_dir() else p
    return None
