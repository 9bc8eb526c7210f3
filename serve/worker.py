"""One job's process: `python -m gesso.serve.worker DATA_DIR JOB_ID`, started by the server (serve/runner.py).

It trains the job with `gesso.train` (or renders a grid job's cells, serve/grid.py), adding each event to the store
with the job's live numbers, so one job's crash, out-of-memory or NaN ends this process and never the server. The
server's requests come on stdin, one a line (`stop`, `save_now`, `sample_now`, `validate_now`), into a
`gesso.Control`. The end of stdin means the server has gone (killed, or shutting down): the run stops at the next
step boundary with its state saved and the process exits INTERRUPTED without an outcome, so that the server, started
again, resumes the job.

A job starts as `--resume auto` would: a finished folder is finished, an unfinished state goes on, and a folder
holding files but no state (killed before its first save) starts again, being the job's own.
"""
import sys
import threading
import time
import traceback
from pathlib import Path

import gesso
from gesso.engine.loop.control import REQUESTS
from gesso.engine.run import rundir
from gesso.serve.grid import run_grid
from gesso.serve.store import DB_FILE, FAILED, FINISHED, LIVE, STOPPED, Store

FINISHED_CODE, CRASHED, BAD_INPUT, STOPPED_CODE, INTERRUPTED = 0, 1, 2, 3, 4


class Requests:
    """The server's requests, read from a stream (stdin) on a thread of their own into the run's Control."""

    def __init__(self, control: gesso.Control):
        self.control = control
        self.stop_asked = False  # a client asked this job to stop
        self.server_gone = False  # the stream ended: the server will resume the job when it is back

    def read(self, stream) -> None:
        for line in stream:
            request = line.strip()
            if request in REQUESTS:
                self.stop_asked |= request == "stop"
                getattr(self.control, request)()
        self.server_gone = True
        self.control.stop()


class Recorder:
    """The run's `on_event`: every event into the store; with a start or step event, the job's live numbers, the ETA
    from the rate since this process started training."""

    def __init__(self, store: Store, job: int):
        self.store, self.job = store, job
        self.since = (time.monotonic(), 0)  # when, and at which step, this process's training began

    def __call__(self, event: dict) -> None:
        live = None
        if event["event"] == "start":
            self.since = (time.monotonic(), event["step"])
            live = {"step": event["step"], "total_steps": event["total_steps"], "epoch": event["epoch"]}
        elif event["event"] == "step":
            began, first = self.since
            rate = (event["step"] - first) / max(time.monotonic() - began, 1e-9)
            live = {k: event[k] for k in LIVE if k in event}
            live["eta_s"] = (event["total_steps"] - event["step"]) / rate if rate > 0 else None
        self.store.add_event(self.job, event, live)


def run(store: Store, job: dict, requests: Requests) -> int:
    """Carry the job out to its outcome, recorded in the store; the process's exit code."""
    if job["kind"] == "grid":
        stopped = run_grid(store, job, lambda: requests.stop_asked or requests.server_gone)
    else:
        stopped = train(store, job, requests)
    if stopped is None:
        return FINISHED_CODE
    if requests.server_gone and not requests.stop_asked:
        return INTERRUPTED
    store.end(job["id"], STOPPED, stopped)
    return STOPPED_CODE


def train(store: Store, job: dict, requests: Requests) -> str | None:
    """Train the job; None once it has finished (recorded), else the line saying where it stopped."""
    cfg = gesso.build_config(job["config"], f"job {job['id']}")
    out = Path(job["output_dir"])
    found = rundir.assess(out, cfg)[0]  # a RESTART (this job killed before its first state) trains again
    if found == rundir.FINISHED:  # a server killed after the final file, before it saw the process end
        store.end(job["id"], FINISHED, f"{cfg.output.name}.safetensors was already written")
        return None
    result = gesso.train(cfg, out, on_event=Recorder(store, job["id"]), resume=out if found == rundir.UNFINISHED else None,
                         progress=False, overwrite=found == rundir.OTHER, control=requests.control)
    if not result.stopped_early:
        store.end(job["id"], FINISHED, f"wrote {result.final.name}")
        return None
    return f"stopped at step {result.step} with its state saved; resume goes on from there"


def main(argv: list[str]) -> int:
    data_dir, job_id = Path(argv[0]), int(argv[1])
    store = Store(data_dir / DB_FILE)
    requests = Requests(gesso.Control())
    threading.Thread(target=requests.read, args=(sys.stdin,), name="server-requests", daemon=True).start()
    try:
        return run(store, store.job(job_id), requests)
    except gesso.GessoError as e:  # bad input met on the way: the error's one line is the job's error
        print(f"error: {e}", file=sys.stderr, flush=True)
        store.end(job_id, FAILED, str(e))
        return BAD_INPUT
    except Exception as e:  # out of memory, a bug: the traceback in worker.log, its last line on the job
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        store.end(job_id, FAILED, f"{type(e).__name__}: {first} (traceback in worker.log)")
        return CRASHED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
