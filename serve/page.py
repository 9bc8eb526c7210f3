"""The page `gesso serve` shows at `/` (static files in serve/static/, no build step) and the routes it needs beyond
the job API: the demo config, a submission's plan (its steps and predicted memory) and grid jobs.

    GET  /                   the page; GET /static/{file} its scripts, styles and the vendored chart library
    GET  /demo               the config the page's "demo" choice submits, with the folder its paths are relative to
    POST /jobs/plan          a submission's steps arithmetic and memory prediction, as `gesso train` and `gesso memory`
                             print them (in serve/app.py, beside /jobs/check, whose body it takes)
    POST /jobs/{id}/grid     queue an epoch x strength grid of a training job's files (serve/grid.py)

The page's files are sent with a Content-Security-Policy that lets it load and connect to its own origin alone,
and they are public: with a token, the page asks for it and sends it with every API request (serve/http.py).
"""
import threading
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from gesso.engine.config.load import build_config
from gesso.engine.loop.inputs import load_dataset
from gesso.engine.loop.plan import Plan
from gesso.engine.memory import memtrace
from gesso.errors import GessoError
from gesso.serve.grid import GridRequest, check_grid
from gesso.serve.jobs import RequestError, error_key
from gesso.serve.store import Store

STATIC = Path(__file__).resolve().parent / "static"
CSP = ("default-src 'self'; connect-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
           "Referrer-Policy": "no-referrer"}
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".txt": "text/plain", ".svg": "image/svg+xml"}
BUNDLED_DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.toml"  # in a clone (an editable install)
MEMORY_NOTE = ("predicted on the meta device, not measured: the CUDA context and the allocator's fragmentation come on "
               "top (gesso memory)")
_planning = threading.Lock()  # one prediction at a time: each runs the step on the meta device, seconds of CPU


def page_files() -> dict[str, Path]:
    """Every file under static/ by its `/`-separated name: the only paths the page's route serves."""
    return {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()}


def page_file(path: Path) -> FileResponse:
    kind = TYPES.get(path.suffix, "text/plain") + "; charset=utf-8"
    return FileResponse(path, media_type=kind, headers=HEADERS)


def plan(config: dict) -> dict:
    """A checked config's (serve/jobs.py check_config's) steps line and memory prediction: `steps` as `gesso train`
    prints it, `memory` as `gesso memory` does; RequestError when its dataset has no trainable image. Not cached: the
    dataset folder may have changed since the last look."""
    cfg = build_config(config, "config")
    with _planning:
        try:
            dataset = load_dataset(cfg)
        except GessoError as e:
            raise RequestError(422, str(e), error_key(str(e)) or "dataset.path") from None
        tc = cfg.train
        steps = Plan(dataset, tc.batch_size, tc.epochs, tc.gradient_accumulation_steps)
        memory = memtrace.predict(cfg)
    return {"steps": steps.describe(), "total_steps": steps.total_steps, "memory": memory.describe(),
            "peak_gib": memory.peak_gib, "note": MEMORY_NOTE}


def add_page(app: FastAPI, store: Store, runner, jobs_dir: Path, demo: Path | None, found) -> None:
    """The page's routes on `app`; `found(id)` is the job or a 404 RequestError."""
    files = page_files()

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return page_file(files["index.html"])

    @app.get("/static/{path:path}", include_in_schema=False)
    def static(path: str) -> FileResponse:
        if path not in files:
            raise RequestError(404, f"/static/{path}: no such file", "path")
        return page_file(files[path])

    @app.get("/demo", summary="The demo config the page offers: its TOML text and the folder its paths are relative to")
    def demo_config() -> dict:
        if demo is None or not demo.is_file():
            raise RequestError(404, "no demo config on this server: the bundled one comes with a clone of the repository "
                                    "(examples/demo.toml); start the server with --demo FILE.toml", "demo")
        return {"config": demo.read_text(), "base": str(demo.parent), "file": str(demo)}

    @app.post("/jobs/{job_id}/grid", status_code=201, summary="Queue an epoch x strength grid of a training job's files")
    def grid(job_id: int, body: GridRequest) -> dict:
        run = found(job_id)
        job = store.submit(f"{run['name']} grid", check_grid(run, body), body.model_dump(), [], jobs_dir, kind="grid")
        runner.wake()
        return job
