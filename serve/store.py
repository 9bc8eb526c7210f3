"""The service's one record: its jobs and every job's events, in SQLite in the data folder.

A job is `queued`, `running`, or ended: `finished`, `failed`, `stopped` (by a request; `resume` queues it again) or
`cancelled` (while queued). Every change of status is also an event of the job, in the same transaction, so the
event history tells the whole run and a client streaming it sees the end. The server (serve/runner.py) and each
job's process (serve/worker.py) write here; SQLite's write-ahead log lets them, and a committed change survives a
kill -9 of either, so a restarted server finds the queue as it was.

Events are the in-process API's dicts (engine/run/events.py), numbered 1, 2, ... per job: the number is the
server-sent event's id. The status events are the server's own: `{"event": "status", "status", "message", "time"}`.
"""
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DB_FILE = "jobs.db"
SCHEMA_VERSION = 2  # PRAGMA user_version: a queue written by a later schema is refused, never misread
QUEUED, RUNNING, FINISHED, FAILED, STOPPED, CANCELLED = "queued", "running", "finished", "failed", "stopped", "cancelled"
ENDED = (FINISHED, FAILED, STOPPED, CANCELLED)
RESUMABLE = (FAILED, STOPPED, CANCELLED)  # what POST /jobs/{id}/resume queues again
LIVE = ("step", "total_steps", "epoch", "loss", "lr", "steps_per_s", "peak_memory_gib", "eta_s")  # from the last step

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'train',  -- train, or grid: an epoch x strength grid of a run's files (serve/grid.py)
    status TEXT NOT NULL,
    config TEXT NOT NULL,           -- the checked config, as JSON shaped like the TOML
    request TEXT NOT NULL,          -- what the client sent: config, overrides, base
    notices TEXT NOT NULL,          -- JSON list: what the server changed in the config, and why
    output_dir TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    device TEXT,                    -- the GPU the job runs on, "cpu" without one
    pid INTEGER,                    -- its process while running
    stop_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    live TEXT NOT NULL DEFAULT '{}' -- JSON: the last step's numbers and the ETA
);
CREATE TABLE IF NOT EXISTS events (
    job INTEGER NOT NULL REFERENCES jobs(id),
    seq INTEGER NOT NULL,
    data TEXT NOT NULL,
    UNIQUE (job, seq)
);
"""


class Store:
    """Jobs and events in one SQLite file; one connection per thread (each process opens its own Store)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()
        db = self._db()
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"its schema is version {version}, this Gesso reads version {SCHEMA_VERSION}")
        upgrade = "ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'train';" if version == 1 else ""  # before grids
        db.executescript(f"BEGIN IMMEDIATE; {SCHEMA} {upgrade} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # autocommit: every write below opens its own BEGIN IMMEDIATE, so reads never hold a transaction open
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=True)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a commit survives a killed process (not a power cut's last ones)
            self._local.db = db
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @staticmethod
    def _event(db: sqlite3.Connection, job: int, event: dict) -> int:
        seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job = ?", (job,)).fetchone()[0]
        db.execute("INSERT INTO events (job, seq, data) VALUES (?, ?, ?)", (job, seq, json.dumps(event)))
        return seq

    def _status(self, db: sqlite3.Connection, job: int, status: str, message: str | None = None) -> None:
        self._event(db, job, {"event": "status", "status": status, "message": message, "time": time.time()})

    def submit(self, name: str, config: dict, request: dict, notices: list[str], jobs_dir: Path, kind: str = "train") -> dict:
        with self._write() as db:
            job = db.execute("INSERT INTO jobs (name, kind, status, config, request, notices, output_dir, created_at) "
                             "VALUES (?, ?, ?, ?, ?, ?, '', ?)", (name, kind, QUEUED, json.dumps(config), json.dumps(request),
                                                                  json.dumps(notices), time.time())).lastrowid
            db.execute("UPDATE jobs SET output_dir = ? WHERE id = ?", (str(jobs_dir / str(job)), job))
            self._status(db, job, QUEUED, "; ".join(notices) or None)
        return self.job(job)

    def job(self, job: int) -> dict | None:
        row = self._db().execute("SELECT * FROM jobs WHERE id = ?", (job,)).fetchone()
        return _job(row) if row else None

    def status(self, job: int) -> str | None:
        row = self._db().execute("SELECT status FROM jobs WHERE id = ?", (job,)).fetchone()
        return row[0] if row else None

    def jobs(self) -> list[dict]:
        return [_job(row) for row in self._db().execute("SELECT * FROM jobs ORDER BY id")]

    def claim_next(self, device: str) -> dict | None:
        """The oldest queued job, now running on `device`; None when none is queued."""
        with self._write() as db:
            row = db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY id LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = ?, device = ?, started_at = ?, ended_at = NULL, error = NULL, pid = NULL, "
                       "stop_requested = 0 WHERE id = ?", (RUNNING, device, time.time(), row["id"]))
            self._status(db, row["id"], RUNNING, f"on {device}")
        return self.job(row["id"])

    def set_pid(self, job: int, pid: int | None) -> None:
        with self._write() as db:
            db.execute("UPDATE jobs SET pid = ? WHERE id = ?", (pid, job))

    def end(self, job: int, status: str, message: str | None = None) -> bool:
        """A running job ended (`status` one of ENDED); False when it was not running."""
        with self._write() as db:
            changed = db.execute("UPDATE jobs SET status = ?, error = ?, ended_at = ?, pid = NULL WHERE id = ? AND status = ?",
                                 (status, message if status == FAILED else None, time.time(), job, RUNNING)).rowcount
            if changed:
                self._status(db, job, status, message)
        return bool(changed)

    def requeue(self, job: int, message: str) -> bool:
        """A running job whose process ended without an outcome (the server went away): queued, to resume."""
        return self._move(job, (RUNNING,), QUEUED, message)

    def cancel(self, job: int) -> bool:
        return self._move(job, (QUEUED,), CANCELLED, "cancelled before it started")

    def resume(self, job: int) -> bool:
        return self._move(job, RESUMABLE, QUEUED, "queued again: it goes on from its last state")

    def _move(self, job: int, sources: tuple[str, ...], status: str, message: str) -> bool:
        with self._write() as db:
            marks = ", ".join("?" * len(sources))
            changed = db.execute(f"UPDATE jobs SET status = ?, pid = NULL, ended_at = ? WHERE id = ? AND status IN ({marks})",
                                 (status, time.time() if status in ENDED else None, job, *sources)).rowcount
            if changed:
                self._status(db, job, status, message)
        return bool(changed)

    def request_stop(self, job: int) -> None:
        """Remembered, so that a job whose stop was asked is not resumed by a server restarted before it stopped."""
        with self._write() as db:
            db.execute("UPDATE jobs SET stop_requested = 1 WHERE id = ?", (job,))

    def add_event(self, job: int, event: dict, live: dict | None = None) -> int:
        """Append one of the run's events (and, with `live`, the job's live numbers); its number."""
        with self._write() as db:
            if live is not None:
                db.execute("UPDATE jobs SET live = ? WHERE id = ?", (json.dumps(live), job))
            return self._event(db, job, event)

    def events_after(self, job: int, after: int, limit: int = 500) -> list[tuple[int, str]]:
        """(number, JSON text) of the job's events after number `after`, oldest first."""
        rows = self._db().execute("SELECT seq, data FROM events WHERE job = ? AND seq > ? ORDER BY seq LIMIT ?",
                                  (job, after, limit))
        return [(seq, data) for seq, data in rows]

    def last_event(self) -> int:
        """A number that grows with every event of every job: what the server's event streams wait on."""
        return self._db().execute("SELECT COALESCE(MAX(rowid), 0) FROM events").fetchone()[0]

    def running(self) -> list[dict]:
        return [_job(row) for row in self._db().execute("SELECT * FROM jobs WHERE status = ? ORDER BY id", (RUNNING,))]


def _job(row: sqlite3.Row) -> dict:
    """A job as the API shows it: its record, the live numbers at the top level, the config and request parsed."""
    job = {k: row[k] for k in row.keys() if k not in ("live", "config", "request", "notices", "stop_requested")}
    live = json.loads(row["live"])
    job.update({k: live.get(k) for k in LIVE})
    job.update(config=json.loads(row["config"]), request=json.loads(row["request"]), notices=json.loads(row["notices"]),
               stop_requested=bool(row["stop_requested"]))
    return job
