"""`gesso serve`: the HTTP job API over the queue (serve/store.py) and its runner (serve/runner.py).

    POST /jobs                     submit {"config": TOML text or JSON object, "overrides": [...], "base": folder}
    POST /jobs/check               the same checks, nothing queued
    POST /jobs/plan                the same checks, then the steps arithmetic and the memory prediction (serve/page.py)
    GET  /jobs                     every job with its live numbers (status, step/total, loss, ETA, peak memory)
    GET  /jobs/{id}                one job, with its config and the server's notices
    GET  /jobs/{id}/events         its events as server-sent events; Last-Event-ID (or ?after=N) resumes
    POST /jobs/{id}/stop, /save-now, /sample-now, /validate-now    a running job's requests (gesso.Control)
    POST /jobs/{id}/cancel         a queued job;   POST /jobs/{id}/resume   a stopped, failed or cancelled one
    GET  /jobs/{id}/files          what it wrote;  GET /jobs/{id}/files/{path}   one of those files

The page at / and its routes (the demo config, grid jobs) are serve/page.py's. The OpenAPI schema is served at
/openapi.json (and browsable at /docs). Errors are JSON (serve/http.py).
"""
import asyncio
import contextlib
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

import gesso
from gesso.engine.run.rundir import Busy, release_lock, take_lock
from gesso.errors import ConfigError
from gesso.serve.http import Feed, Guard, event_stream, has_more
from gesso.serve.jobs import JOBS_DIR, RequestError, check_config, job_file, job_files, relative_path
from gesso.serve.page import BUNDLED_DEMO, add_page, plan
from gesso.serve.runner import Runner
from gesso.serve.store import DB_FILE, QUEUED, RESUMABLE, RUNNING, Store

CONTROLS = {"stop": "stop", "save-now": "save_now", "sample-now": "sample_now", "validate-now": "validate_now"}
SUMMARY_HIDES = ("config", "request", "notices")
LOCK_FILE = "server.lock"


class JobRequest(BaseModel):
    """A job to queue: the training config with its paths on the server's disk."""

    model_config = ConfigDict(extra="forbid")
    config: str | dict[str, Any] = Field(description="the training config: TOML text, or a JSON object shaped like the "
                                                     "TOML (README, 'Config reference')")
    overrides: list[str] = Field(default_factory=list, description="section.key=value, as `gesso train --set` takes them")
    base: str | None = Field(None, description="absolute folder on the server that relative paths in the config resolve "
                                               "against; default: the server's working folder")


def create_app(store: Store, runner: Runner, data_dir: Path, token: str | None, demo: Path | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        feed_task = asyncio.create_task(feed.run())
        runner.start()
        yield
        feed_task.cancel()
        await asyncio.to_thread(runner.shutdown)

    app = FastAPI(title="Gesso", version=gesso.__version__, lifespan=lifespan,
                  description="A local training service: a persistent queue of LoRA training jobs, one at a time per "
                              "device, each in its own process, with live events. Errors are JSON: "
                              '{"error": "<one line>", "key": "<config key or request field, or null>"}.')
    app.add_middleware(Guard, token=token)
    feed = Feed(store)
    jobs_dir = data_dir.resolve() / JOBS_DIR

    def found(job_id: int) -> dict:
        job = store.job(job_id)
        if job is None:
            raise RequestError(404, f"no job {job_id}", "id")
        return job

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"error": e.message, "key": e.key}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        key = ".".join(str(part) for part in first["loc"][1:]) or "body"
        return JSONResponse({"error": f"{key}: {first['msg']}", "key": key}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": f"{request.url.path}: {e.detail}", "key": None}, status_code=e.status_code,
                            headers=e.headers)

    @app.post("/jobs", status_code=201, summary="Queue a job")
    def submit(body: JobRequest) -> dict:
        config, notices = check_config(body.config, body.overrides, body.base, data_dir)
        job = store.submit(config["output"]["name"], config, body.model_dump(), notices, jobs_dir)
        runner.wake()
        return job

    @app.post("/jobs/check", summary="Check a job's config as submitting does, queueing nothing")
    def check(body: JobRequest) -> dict:
        config, notices = check_config(body.config, body.overrides, body.base, data_dir)
        return {"config": config, "notices": notices}

    @app.post("/jobs/plan", summary="Check a job's config, then give its steps arithmetic and predicted peak memory")
    def planned(body: JobRequest) -> dict:
        config, notices = check_config(body.config, body.overrides, body.base, data_dir)
        return {**plan(config), "notices": notices}

    # the reads a client polls run on the event loop, not on a worker thread: a read of the store (WAL) never waits on
    # its writers, and takes less than handing it to a thread and back
    @app.get("/jobs", summary="Every job, oldest first, with its live numbers")
    async def listing() -> dict:
        return {"jobs": [{k: v for k, v in job.items() if k not in SUMMARY_HIDES} for job in store.jobs()]}

    @app.get("/jobs/{job_id}", summary="One job: status, live numbers, config, notices")
    async def show(job_id: int) -> dict:
        return found(job_id)

    @app.get("/jobs/{job_id}/events", summary="The job's events as server-sent events, from the first or after "
                                               "Last-Event-ID", response_class=StreamingResponse)
    async def events(job_id: int, after: int = 0, last_event_id: str | None = Header(None)):
        found(job_id)
        if last_event_id is not None:
            if not last_event_id.strip().isdigit():
                raise RequestError(400, f"Last-Event-ID {last_event_id!r}: expected an event number", "Last-Event-ID")
            after = int(last_event_id)
        if not has_more(store, job_id, after):
            return Response(status_code=204)  # ended and all sent: EventSource stops reconnecting
        return StreamingResponse(event_stream(store, feed, job_id, after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def control(job_id: int, request: str) -> dict:
        job = found(job_id)
        if job["status"] == QUEUED:
            raise RequestError(409, f"job {job_id} is queued, not running: cancel it with POST /jobs/{job_id}/cancel", "id")
        if job["status"] != RUNNING:
            raise RequestError(409, f"job {job_id} is {job['status']}, not running", "id")
        if job["kind"] != "train" and request != "stop":
            raise RequestError(409, f"job {job_id} is a {job['kind']} job: it takes stop alone", "id")
        if request == "stop":
            store.request_stop(job_id)  # kept: a server restarted before the job stopped stops it rather than resuming
        if not runner.send(job_id, request):
            raise RequestError(409, f"job {job_id} is starting or ending: its process takes no requests at this moment; "
                                    "try again", "id")
        return {"id": job_id, "request": request, "accepted": True}

    def control_route(request: str):
        def route(job_id: int) -> dict:
            return control(job_id, request)
        route.__name__ = request
        return route

    for path, request in CONTROLS.items():
        app.post(f"/jobs/{{job_id}}/{path}", status_code=202, summary=f"Ask a running job to {request.replace('_', ' ')} "
                 "at its next step boundary (answered by a 'control' event)")(control_route(request))

    @app.post("/jobs/{job_id}/cancel", summary="Cancel a queued job")
    def cancel(job_id: int) -> dict:
        job = found(job_id)
        if not store.cancel(job_id):
            how = f"stop it with POST /jobs/{job_id}/stop" if job["status"] == RUNNING else "it has ended"
            raise RequestError(409, f"job {job_id} is {job['status']}, not queued: {how}", "id")
        return store.job(job_id)

    @app.post("/jobs/{job_id}/resume", summary="Queue a stopped, failed or cancelled job again; it goes on from its state")
    def resume(job_id: int) -> dict:
        job = found(job_id)
        if not store.resume(job_id):
            raise RequestError(409, f"job {job_id} is {job['status']}: only a {', '.join(RESUMABLE)} job resumes", "id")
        runner.wake()
        return store.job(job_id)

    @app.get("/jobs/{job_id}/files", summary="The files a job wrote: LoRA files, previews, metrics, state, log")
    def files(job_id: int) -> dict:
        return {"files": job_files(Path(found(job_id)["output_dir"]))}

    @app.get("/jobs/{job_id}/files/{path:path}", summary="Download one of a job's files", response_class=FileResponse)
    def download(job_id: int, path: str):
        parts = relative_path(path)  # first: a path that could leave the folder is refused whatever the job
        return FileResponse(job_file(Path(found(job_id)["output_dir"]), parts))

    add_page(app, store, runner, jobs_dir, demo, found)
    return app


def serve(host: str, port: int, data_dir: Path, token: str | None, devices: list[str], demo: Path | None = BUNDLED_DEMO) -> None:
    """Hold `data_dir` (one server per data folder), listen on host:port (0: a free port), print the address, and
    serve until Ctrl-C or SIGTERM; the running jobs then stop at their next step boundary, to resume at the next start."""
    import uvicorn

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock, _ = take_lock(data_dir / LOCK_FILE)
    except Busy as e:
        raise ConfigError(f"--data {data_dir}: in use by another gesso serve ({e.holder})") from None
    except OSError as e:
        raise ConfigError(f"--data {data_dir}: cannot use it ({e.strerror or e})") from None
    try:
        sock = listen(host, port)
        try:
            store = Store(data_dir / DB_FILE)
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"{data_dir / DB_FILE}: not a queue this server can read ({e})") from None
        app = create_app(store, Runner(store, data_dir, devices), data_dir, token, demo)
        address = f"[{host}]" if ":" in host else host
        print(f"gesso serve: http://{address}:{sock.getsockname()[1]} (data folder {data_dir.resolve()}; one job at a "
              f"time on {', '.join(devices)}; the page at /, the API schema at /docs)", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)).run(sockets=[sock])
    finally:
        release_lock(data_dir / LOCK_FILE, lock)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port. Made with IPPROTO_TCP, not 0 as socket.create_server makes it: asyncio
    turns Nagle's algorithm off (TCP_NODELAY) only on connections of such sockets, and with it on, each keep-alive
    response waited 40 ms for the client's delayed ACK between its headers and its body."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock
