"""A run's folder: one run at a time in it, an earlier run's files never replaced unasked, and no temporary
files left behind by a run that was killed.

The lock is an advisory lock (flock) on `.gesso.lock`, which holds the owner's pid, host and start time. The
kernel drops an advisory lock when its process dies, however it dies (kill -9, a crash, a power cut on the
host), so a lock that can be taken is never held by a live run: a dead run's lock is taken over at once, with
no pid-liveness guess (pids are reused) and no timeout to wait out. The file's text only names the holder.
"""
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gesso.engine.io import TEMP_NAME, output_error
from gesso.engine.run.state import STATE_FILE
from gesso.errors import TrainError

if os.name == "nt":
    import msvcrt
else:
    import fcntl

LOCK_FILE = ".gesso.lock"
LOG_FILE = "metrics.jsonl"
RUN_FOLDERS = ("samples", "tensorboard")


@contextmanager
def claim(folder: Path, name: str, fresh: bool) -> Iterator[None]:
    """Hold `folder` for one run: lock it (TrainError when another run holds it), remove the temporary files a
    killed run left, and, for a `fresh` run, refuse a folder holding an earlier run's files. The lock is released
    on every way out of the block, an exception or Ctrl-C included."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _lock(folder)
    except OSError as e:  # read-only, full, or a file in the way: named as every other write names it
        raise output_error(folder, e) from None
    try:
        removed = remove_temp_files(folder)
        if removed:
            print(f"notice: {folder}: removed {removed} temporary file(s) left by an interrupted run", file=sys.stderr, flush=True)
        if fresh:
            refuse_earlier_run(folder, name)
        yield
    finally:
        _unlock(folder, fd)


def earlier_run_files(folder: Path, name: str) -> list[str]:
    """The files in `folder` a run named `name` writes, which a new run would replace."""
    found = sorted(p.name for p in folder.iterdir() if p.is_file() and (p.name == f"{name}.safetensors" or
                                                                         p.name.startswith(f"{name}-") and p.suffix == ".safetensors"))
    found += [f for f in (STATE_FILE, LOG_FILE) if (folder / f).is_file()]
    found += [f"{d}/" for d in RUN_FOLDERS if (folder / d).is_dir() and any((folder / d).iterdir())]
    return found


NEW, UNFINISHED, FINISHED, OTHER = "new", "unfinished", "finished", "other"


def run_status(folder: Path, name: str) -> str:
    """What `--resume auto` finds in `folder`, reading only: NEW (no run's files), UNFINISHED (a state.pt and no
    final <name>.safetensors: go on from it), FINISHED (the final file), OTHER (files of a run that left no state,
    which refuse_earlier_run refuses)."""
    found = earlier_run_files(folder, name) if folder.is_dir() else []
    if not found:
        return NEW
    if f"{name}.safetensors" in found:
        return FINISHED
    return UNFINISHED if STATE_FILE in found else OTHER


def refuse_earlier_run(folder: Path, name: str) -> None:
    found = earlier_run_files(folder, name)
    if not found:
        return
    listed = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    # a finished run's state.pt has nothing left to resume
    resume = f"go on with --resume {folder}, " if STATE_FILE in found and f"{name}.safetensors" not in found else ""
    raise TrainError(f"{folder} holds an earlier run's files ({listed}): {resume}replace them with --overwrite, "
                     "or write to another output folder (--output-dir)")


def remove_temp_files(folder: Path) -> int:
    """Remove the temp files of atomic writes cut short (`.<name>.<random>.tmp`) in `folder` and its samples/."""
    removed = 0
    for d in (folder, folder / "samples"):
        for p in d.iterdir() if d.is_dir() else ():
            if TEMP_NAME.fullmatch(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed += 1
    return removed


class Busy(Exception):
    """A lock another live process holds; `holder` is the line it wrote (pid, host, start time)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def take_lock(path: Path) -> tuple[int, str]:
    """This process's advisory lock on the file `path` (created if need be), holding our pid, host and start time:
    its descriptor, and the line of an earlier holder that ended without releasing it ("" if none). Busy when a live
    process holds it. The run folder's lock, and `gesso serve`'s on its data folder."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = _holder(fd) or "pid unknown"
            os.close(fd)
            raise Busy(holder)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file between our open and lock: lock the new file
    earlier = _holder(fd, wait=False)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    return fd, earlier


def release_lock(path: Path, fd: int) -> None:
    # emptied first: where the file cannot be removed while open (Windows), the next holder finds no one named
    os.ftruncate(fd, 0)
    try:
        path.unlink()
    except OSError:
        pass
    os.close(fd)  # closing releases the lock


def _lock(folder: Path) -> int:
    try:
        fd, earlier = take_lock(folder / LOCK_FILE)
    except Busy as e:
        raise TrainError(f"{folder} is in use by another run ({e.holder}): wait for it to end, "
                         "stop it, or write to another output folder (--output-dir)") from None
    if earlier:
        print(f"notice: {folder}: taking over the lock of a run that ended without releasing it ({earlier})", file=sys.stderr, flush=True)
    return fd


def _unlock(folder: Path, fd: int) -> None:
    release_lock(folder / LOCK_FILE, fd)


def _holder(fd: int, wait: bool = True) -> str:
    """The holder's line, or ""; a run that has just taken the lock writes it a moment later, hence the short wait."""
    for attempt in range(20 if wait else 1):
        if attempt:
            time.sleep(0.05)
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 200).decode(errors="replace").strip()
        if text:
            return text
    return ""


if os.name == "nt":
    def _try_lock(fd: int) -> bool:
        # a byte far past the holder's line: a locked range cannot be read by others on Windows
        os.lseek(fd, 1 << 20, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
else:
    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
