"""A real `gesso serve` for the tests: a subprocess on a free port of 127.0.0.1 with its data folder in tmp, an httpx
client for it, and a reader of its server-sent events. Every wait is bounded: a test that goes wrong fails with the
server's output, it never hangs."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
DEMO_TOML = (ROOT / "tests" / "data" / "demo.toml").read_text()
DEMO_DIR = ROOT / "tests" / "data"
# 12 images / batch 4 = 3 steps per epoch at 64 px; previews only when asked (sample-now), at 2 sampling steps
SHORT = ["dataset.repeats=1", "dataset.resolution=64", "output.save_dtype='fp32'", "output.tensorboard=false",
         "sample.every_n_epochs=0", "sample.steps=2"]
START_S = 180  # a server's start: Python, torch and the package imported on a loaded 2-core machine
READ_S = 120  # the longest silence an event stream may have before the test fails


class Server:
    """`python -m gesso.cli serve --port 0 --data DATA [ARGS]`, its address read from its first line."""

    def __init__(self, data: Path, *args: str, token: str | None = None, cwd: Path | None = None, base: Path = DEMO_DIR):
        self.data, self.token, self.base = data, token, base  # base: the folder the jobs' dataset paths are relative to
        env = dict(os.environ, OMP_NUM_THREADS="1")  # its jobs' processes too: the test machine is shared
        command = [sys.executable, "-m", "gesso.cli", "serve", "--port", "0", "--data", str(data), *args]
        self.proc = subprocess.Popen(command + (["--token", token] if token else []), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + START_S
        while not any(line.startswith("gesso serve: http://") for line in self.lines):
            assert self.proc.poll() is None and time.monotonic() < deadline, f"the server did not start:\n{self.output()}"
            time.sleep(0.05)
        self.url = next(line for line in self.lines if line.startswith("gesso serve: ")).split()[2]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(30.0, read=READ_S))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)[-4000:]

    def kill(self) -> None:
        """kill -9: no shutdown of any kind; its jobs' processes find their stdin closed."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.client.close()

    def stop(self) -> None:
        """SIGTERM, then every job process it started and left (own sessions: nothing else ends them)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.client.close()
        kill_workers(self.data)

    def submit(self, *overrides: str, config: str | dict = DEMO_TOML) -> dict:
        r = self.client.post("/jobs", json={"config": config, "base": str(self.base), "overrides": [*SHORT, *overrides]})
        assert r.status_code == 201, r.text
        return r.json()

    def wait(self, job: int, *statuses: str, timeout: float = 300) -> dict:
        """The job once its status is one of `statuses`."""
        deadline = time.monotonic() + timeout
        while (found := self.client.get(f"/jobs/{job}").json())["status"] not in statuses:
            assert time.monotonic() < deadline, f"job {job} is {found['status']}:\n{self.output()}"
            time.sleep(0.1)
        return found


def read_events(server: Server, job: int, until=None, last_id: int | None = None) -> list[tuple[int, dict]]:
    """(id, event) of the job's server-sent events from the start (or after `last_id`, sent as Last-Event-ID) until
    the stream ends with the job, or until `until(event)` is true: then the connection is closed."""
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    out, seq = [], None
    with server.client.stream("GET", f"/jobs/{job}/events", headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.status_code
        for line in r.iter_lines():
            if line.startswith("id: "):
                seq = int(line[4:])
            elif line.startswith("data: "):
                out.append((seq, json.loads(line[6:])))
                if until is not None and until(out[-1][1]):
                    break
    return out


def kill_workers(data: Path) -> None:
    """End every job process a test's server left running (the store names them; /proc confirms each is one)."""
    import sqlite3

    db = data / "jobs.db"
    if not db.exists():
        return
    with sqlite3.connect(db) as conn:
        pids = [pid for (pid,) in conn.execute("SELECT pid FROM jobs WHERE pid IS NOT NULL")]
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists() and b"gesso.serve.worker" in cmdline.read_bytes():
            os.kill(pid, signal.SIGKILL)


def is_step(n: int):
    return lambda event: event["event"] == "step" and event["step"] == n
