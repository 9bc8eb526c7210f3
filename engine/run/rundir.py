"""A run's folder: one run at a time in it, an earlier run's files never replaced unasked (nor, with --overwrite,
before the new run writes its first file), the same run's files from a start killed before its first state taken
back as its own (the folder's manifest, engine/run/manifest.py, says which run they are), and no temporary files
left behind by a run that was killed.

The lock is an advisory lock (flock) on `.gesso.lock`, which holds the owner's pid, host and start time. The
kernel drops an advisory lock when its process dies, however it dies (kill -9, a crash, a power cut on the
host), so a lock that can be taken is never held by a live run: a dead run's lock is taken over at once, with
no pid-liveness guess (pids are reused) and no timeout to wait out. The file's text only names the holder.
"""
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gesso.engine.config.sections import Config
from gesso.engine.io import TEMP_NAME, output_error
from gesso.engine.run.manifest import differences, read_manifest, write_manifest
from gesso.engine.run.state import STATE_FILE
from gesso.errors import TrainError

if os.name == "nt":
    import msvcrt
else:
    import fcntl

LOCK_FILE = ".gesso.lock"
LOG_FILE = "metrics.jsonl"
RUN_FOLDERS = {"samples": "*.png", "tensorboard": "events.*"}  # a run's folders, and the files it writes there
FRESH, RESUME, OVERWRITE = "fresh", "resume", "overwrite"  # how a run takes its folder
NEW, UNFINISHED, FINISHED, RESTART, OTHER = "new", "unfinished", "finished", "restart", "other"  # what it finds there


@dataclass
class Claim:
    """A run's hold on its folder: the intermediate files of its own earlier start, killed before its first state
    (`kept`, oldest first; the run writes each again as it reaches it), and with --overwrite the earlier run's files
    (`replaced`), which stay whole until this run writes its first file (`prove`). The manifest of a run that goes
    on with or replaces another's files is written then too (`manifest_due`): a resume whose state turns out not to
    fit, or an overwrite that fails, leaves the folder's manifest as it was."""

    folder: Path
    cfg: Config
    kept: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    manifest_due: bool = False
    waiting: list[Callable[[], None]] = field(default_factory=list)

    def prove(self) -> None:
        """Called before each file the run writes; the first call removes the replaced files (state.pt first, so that
        no half-removed run is ever resumed), writes the manifest that is due and starts what waited for it."""
        for entry in sorted(self.replaced, key=lambda e: e != STATE_FILE):
            _remove(self.folder, entry)
        self.replaced = []
        if self.manifest_due:
            write_manifest(self.folder, self.cfg)
            self.manifest_due = False
        for start in self.waiting:
            start()
        self.waiting = []

    def when_proved(self, start: Callable[[], None]) -> None:
        """`start()` now, or once the earlier run's files are gone (the run's logs: an overwrite keeps the earlier
        ones until its first file)."""
        if self.replaced:
            self.waiting.append(start)
        else:
            start()


@contextmanager
def claim(folder: Path, cfg: Config, mode: str) -> Iterator[Claim]:
    """Hold `folder` for one run: lock it (TrainError when another run holds it), remove the temporary files a
    killed run left, then, by `mode`: FRESH refuses a folder holding an earlier run's files, but for this same run's
    own files left by a start killed before its first state (it starts again, keeping them); OVERWRITE sets the
    earlier run's files to go at the first file this run writes; RESUME goes on with them. A fresh run's manifest is
    written now, before anything else; a resumed or overwriting one's at its first file (Claim). The lock is
    released on every way out of the block, an exception or Ctrl-C included."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _lock(folder)
    except OSError as e:  # read-only, full, or a file in the way: named as every other write names it
        raise output_error(folder, e) from None
    try:
        removed = remove_temp_files(folder)
        if removed:
            print(f"notice: {folder}: removed {removed} temporary file(s) left by an interrupted run", file=sys.stderr, flush=True)
        held = Claim(folder, cfg)
        if mode == FRESH:
            held.kept = _fresh(folder, cfg)
        elif mode == OVERWRITE:
            held.replaced = earlier_run_files(folder, cfg.output.name)
        held.manifest_due = mode == RESUME or bool(held.replaced)
        if not held.manifest_due:  # before the run's first file, its log included: a kill after it finds the run's own
            write_manifest(folder, cfg)
        yield held
    finally:
        _unlock(folder, fd)


def _fresh(folder: Path, cfg: Config) -> list[str]:
    """A fresh run's check of its folder: the files it keeps (its own killed start's), or a TrainError refusing it."""
    status, found, differ = assess(folder, cfg)
    if status == NEW:
        return []
    if status != RESTART:
        refuse_earlier_run(folder, cfg.output.name, found, differ)
    kept = sorted((f for f in found if f.endswith(".safetensors")), key=lambda f: (folder / f).stat().st_mtime_ns)
    print(f"notice: {folder}: this run was stopped before its first state.pt; starting it again from step 0 "
          f"({len(kept)} of its files kept, each written again as the run reaches it)", file=sys.stderr, flush=True)
    return kept


def earlier_run_files(folder: Path, name: str) -> list[str]:
    """The files in `folder` a run named `name` writes, which a new run would replace."""
    found = sorted(p.name for p in folder.iterdir() if p.is_file() and (p.name == f"{name}.safetensors" or
                                                                         p.name.startswith(f"{name}-") and p.suffix == ".safetensors"))
    found += [f for f in (STATE_FILE, LOG_FILE) if (folder / f).is_file()]
    found += [f"{d}/" for d in RUN_FOLDERS if (folder / d).is_dir() and any((folder / d).iterdir())]
    return found


def assess(folder: Path, cfg: Config) -> tuple[str, list[str], list[str]]:
    """What a run of `cfg` finds in `folder`, reading only: its status, the earlier run's files, and the config keys in
    which that run differs (from the manifest). NEW: no run's files. OTHER: another config's files, or files with
    neither state nor manifest. For this run (or, without a manifest, any run), FINISHED: the final <name>.safetensors;
    UNFINISHED: a state.pt to go on from; RESTART: this run's files, its start killed before its first state."""
    name = cfg.output.name
    found = earlier_run_files(folder, name) if folder.is_dir() else []
    if not found:
        return NEW, found, []
    manifest = read_manifest(folder)
    differ = differences(manifest, cfg) if manifest else []
    if differ:
        return OTHER, found, differ
    if f"{name}.safetensors" in found:
        return FINISHED, found, []
    if STATE_FILE in found:
        return UNFINISHED, found, []
    return (RESTART if manifest else OTHER), found, []


def refuse_earlier_run(folder: Path, name: str, found: list[str], differ: list[str]) -> None:
    listed = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    other = f" of another config ({', '.join(differ[:3])}{' and more' if len(differ) > 3 else ''} differ)" if differ else ""
    # a finished run's state.pt has nothing left to resume
    resume = f"go on with --resume {folder}, " if STATE_FILE in found and f"{name}.safetensors" not in found else ""
    raise TrainError(f"{folder} holds an earlier run's files ({listed}){other}: {resume}replace them with --overwrite, "
                     "or write to another output folder (--output-dir)")


def _remove(folder: Path, entry: str) -> None:
    """An earlier run's file, or the files a run writes in one of its folders (previews, TensorBoard's events)."""
    try:
        if entry.rstrip("/") in RUN_FOLDERS:
            for p in (folder / entry).glob(RUN_FOLDERS[entry.rstrip("/")]):
                p.unlink(missing_ok=True)
        else:
            (folder / entry).unlink(missing_ok=True)
    except OSError as e:
        raise output_error(folder / entry, e) from None


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
