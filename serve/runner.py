"""The queue's runner, inside the server: the oldest queued job goes to a free device, one job at a time on each,
in a process of its own (serve/worker.py) that sees only its device.

A job's process writes its events and outcome to the store; the runner records what the process could not: a
crash (a signal, the kernel's out-of-memory killer, an exit without an outcome). The runner holds each process's
stdin, through which it passes the clients' requests; when the server goes away, however it goes, that stdin ends
and the job stops at its next step boundary with its state saved. A server started again finds such jobs still
marked running: it waits for their processes to end, then queues them again, and each resumes from its state.
"""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from gesso.errors import ConfigError
from gesso.serve.store import FAILED, STOPPED, Store
from gesso.serve.worker import INTERRUPTED

ORPHAN_WAIT_S = 600  # how long a restarted server waits for a job's old process to save its state and end
SHUTDOWN_WAIT_S = 20  # how long a server shutting down waits for its jobs to stop (they stop on their own after)
TRITON_CACHE = "triton"


def find_devices(spec: str) -> list[str]:
    """The devices jobs run on, one at a time on each: `cpu`, GPU indices (`0,1`), or `auto` (every GPU this process
    sees, as CUDA_VISIBLE_DEVICES lists them, else the CPU). ConfigError for anything else."""
    import torch

    if spec == "cpu":
        return ["cpu"]
    if spec == "auto":
        count = torch.cuda.device_count()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        entries = [e.strip() for e in visible.split(",")][:count] if visible else [str(i) for i in range(count)]
        return [f"cuda:{e}" for e in entries] or ["cpu"]
    entries = [e.strip() for e in spec.split(",")]
    if not all(e.isdigit() for e in entries) or len(set(entries)) != len(entries):
        raise ConfigError(f"--devices {spec}: expected cpu, auto, or distinct GPU indices such as 0,1")
    return [f"cuda:{e}" for e in entries]


class Runner:
    """Starts the queued jobs on free devices and sees their processes end. `devices`: "cpu", or one
    CUDA_VISIBLE_DEVICES entry per GPU (each job's process sees that one GPU)."""

    def __init__(self, store: Store, data_dir: Path, devices: list[str]):
        self.store, self.data_dir = store, data_dir
        self.slots: dict[str, int | None] = dict.fromkeys(devices)  # device -> the job running on it
        self.procs: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.woken = threading.Event()
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="gesso-runner", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self.woken.set()

    def send(self, job: int, request: str) -> bool:
        """Pass a request (engine/loop/control.py REQUESTS) to a running job's process; False when none is running."""
        with self.lock:
            proc = self.procs.get(job)
            if proc is None or proc.poll() is not None:
                return False
            try:
                proc.stdin.write(f"{request}\n".encode())
                proc.stdin.flush()
            except OSError:
                return False
        return True

    def shutdown(self) -> None:
        """Stop starting jobs and end the stdin of each running one, so each stops at its next step boundary with its
        state saved; those that end in time are queued again now, the others by the next server's start."""
        self.closing = True
        self.wake()
        self.thread.join()
        with self.lock:
            for proc in self.procs.values():
                proc.stdin.close()
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        while self.procs and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)

    def _loop(self) -> None:
        self._recover()
        while not self.closing:
            self._reap()
            self._dispatch()
            self.woken.wait(0.5)
            self.woken.clear()

    def _recover(self) -> None:
        """Jobs marked running by a server that ended without seeing them end: their old process (if it lives) saves
        its state and ends, seeing its stdin closed; then each is queued again to resume, or is stopped if a client
        had asked so."""
        for job in self.store.running():
            if job["pid"] and _our_worker(job["pid"], job["id"]):
                print(f"job {job['id']}: waiting for its process (pid {job['pid']}) to save its state", flush=True)
                if not _wait_or_kill(job["pid"], ORPHAN_WAIT_S, lambda: self.closing):
                    return  # the server is shutting down itself: the next start takes it from here
            if self.store.job(job["id"])["stop_requested"]:  # asked before the server went, or while it waited
                self.store.end(job["id"], STOPPED, "stopped as asked, while the server was down")
            else:
                self.store.requeue(job["id"], "the server started again: the job goes on from its last state")

    def _dispatch(self) -> None:
        for device, running in list(self.slots.items()):
            if running is not None or self.closing:
                continue
            job = self.store.claim_next(device)
            if job is None:
                return
            self._spawn(job, device)

    def _spawn(self, job: dict, device: str) -> None:
        out = Path(job["output_dir"])
        env = dict(os.environ, TRITON_CACHE_DIR=str(self.data_dir.resolve() / TRITON_CACHE))  # Triton's cache, ours too
        if device != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = device.removeprefix("cuda:")
        try:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "worker.log", "ab") as log:
                # a session of its own: a Ctrl-C meant for the server reaches the job only as the end of its stdin
                proc = subprocess.Popen([sys.executable, "-m", "gesso.serve.worker", str(self.data_dir.resolve()), str(job["id"])],
                                        stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as e:
            self.store.end(job["id"], FAILED, f"could not start the job's process: {e}")
            return
        with self.lock:
            self.procs[job["id"]] = proc
            self.slots[device] = job["id"]
        self.store.set_pid(job["id"], proc.pid)

    def _reap(self) -> None:
        for device, job in list(self.slots.items()):
            proc = self.procs.get(job) if job is not None else None
            if proc is None or proc.poll() is None:
                continue
            with self.lock:
                del self.procs[job]
                self.slots[device] = None
            proc.stdin.close()
            if proc.returncode == INTERRUPTED:
                self.store.requeue(job, "the server shut down: the job goes on from its last state at its next start")
            else:  # a process that recorded its outcome left the job ended; this changes only a job still running
                self.store.end(job, FAILED, crash_message(proc.returncode, Path(self.store.job(job)["output_dir"])))


def crash_message(code: int, output_dir: Path) -> str:
    """Why a job's process ended without an outcome: the signal that killed it, or its exit code and last line."""
    if code < 0:
        name = signal.Signals(-code).name
        why = " (the system may have run out of memory)" if -code == signal.SIGKILL else ""
        return f"the job's process was killed by {name}{why}; see worker.log"
    lines = (output_dir / "worker.log").read_text(errors="replace").strip().splitlines() if (output_dir / "worker.log").is_file() else []
    return f"the job's process exited with code {code}" + (f": {lines[-1]}" if lines else "")


def _alive(pid: int) -> bool:
    """Whether process `pid` runs: it exists and, where /proc tells, is no zombie (ended, never reaped: its parent,
    the old server, is gone)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if not Path("/proc/self").is_dir():
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _our_worker(pid: int, job: int) -> bool:
    """Whether `pid` runs and, where /proc tells, is the worker process of `job` (pids are reused)."""
    if not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return not Path("/proc/self").is_dir()  # no /proc (macOS): alive is all we can tell
    return b"gesso.serve.worker" in cmdline and str(job).encode() in cmdline


def _wait_or_kill(pid: int, seconds: float, give_up) -> bool:
    """Wait for process `pid` to end, killing it after `seconds`; False (it still runs) when `give_up()` turns true."""
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if give_up():
            return False
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return True
        time.sleep(0.2)
    return True
