"""A grid job: a training job's epoch files by LoRA strength, rendered by `gesso grid`'s code (engine/sampling/render.py
render_grid) in a job process of its own, one `cell` event per image as it is written.

The server checks a request against the run (check_grid) and queues a job of kind `grid` whose config names the run's
folder, the epoch files and every setting, so the job's process (serve/worker.py) needs nothing else. Its events:

- `{"event": "grid", "epochs", "files", "strengths", "total"}` first: the table to fill (columns epochs, rows strengths);
- `{"event": "cell", "row", "col", "file", "strength", "tag", "path", "parameters", "done", "total"}` per image, `tag`
  being the `<lora:name-00000N:w>` that renders it in AUTOMATIC1111 or ComfyUI and `parameters` its infotext;
- `{"event": "save", "kind": "grid", "path"}` for the labelled grid PNG at the end.

A stop asked between two cells ends the job `stopped`; one interrupted by the server going away renders again from
its first cell when the server is back (its cells' files are numbered on, as `gesso grid` numbers its outputs).
"""
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from gesso.engine.sampling import render
from gesso.engine.sampling import sample as single
from gesso.engine.sampling import samplers as sampling
from gesso.errors import RenderError
from gesso.serve.jobs import RequestError
from gesso.serve.store import FINISHED, Store

STRENGTHS = (0.25, 0.5, 0.75, 1.0)
MAX_CELLS = 64
TAG = re.compile(r"<lora:[^>]*>")


class GridRequest(BaseModel):
    """An epoch x strength grid of a training job's files; each setting left out comes from the run's [sample]."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(None, description="A1111 syntax, without a <lora:...> tag (the grid adds it); default: "
                                                 "the run's first preview prompt")
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**32)
    epochs: list[int] | None = Field(None, description="epoch numbers; default: every epoch file the run wrote")
    strengths: list[float] = Field(list(STRENGTHS), min_length=1, max_length=16)
    steps: int | None = Field(None, ge=1, le=150)
    cfg_scale: float | None = Field(None, ge=1, le=30)
    sampler: str | None = None


class Stopped(Exception):
    """A stop was asked between two cells."""


def check_grid(run: dict, body: GridRequest) -> dict:
    """The grid job's config for training job `run` (a job as the store gives it); RequestError naming the field."""
    if run["kind"] != "train":
        raise RequestError(422, f"job {run['id']} is a {run['kind']} job: a grid is made of a training job's files", "id")
    cfg = run["config"]
    sample, name, out = cfg["sample"], cfg["output"]["name"], Path(run["output_dir"])
    try:
        files = render.epoch_files(out, name) if out.is_dir() else []
    except RenderError:
        files = []
    if not files:
        raise RequestError(409, f"job {run['id']} has written no epoch files ({name}-NNNNNN.safetensors) yet", "epochs")
    numbers = {int(p.stem.rsplit("-", 1)[1]): p.stem for p in files}
    epochs = sorted(numbers) if body.epochs is None else body.epochs
    missing = [e for e in epochs if e not in numbers]
    if missing or not epochs or len(set(epochs)) != len(epochs):
        raise RequestError(422, f"epochs: {missing[0] if missing else epochs} is not a list of distinct epochs with files; "
                                f"job {run['id']} has {', '.join(map(str, sorted(numbers)))}", "epochs")
    if not all(-4 <= s <= 4 for s in body.strengths) or len(set(body.strengths)) != len(body.strengths):
        raise RequestError(422, "strengths: expected distinct LoRA strengths from -4 to 4", "strengths")
    if len(epochs) * len(body.strengths) > MAX_CELLS:
        raise RequestError(422, f"epochs x strengths: {len(epochs) * len(body.strengths)} cells, at most {MAX_CELLS}", "epochs")
    prompt = body.prompt if body.prompt is not None else (sample["prompts"] or [""])[0]
    if not prompt.strip():
        raise RequestError(422, "prompt: give a prompt (the run has no preview prompt to default to)", "prompt")
    if TAG.search(prompt):
        raise RequestError(422, "prompt: leave out <lora:...> tags; the grid adds the run's file at each strength", "prompt")
    sampler = body.sampler or sample["sampler"]
    if sampler not in sampling.SAMPLERS:
        raise RequestError(422, f"sampler {sampler!r}: known: {', '.join(sampling.SAMPLERS)}", "sampler")
    return {"run": run["id"], "lora_dir": str(out), "model": cfg["model"], "epochs": [numbers[e] for e in epochs],
            "strengths": list(body.strengths), "prompt": prompt,
            "negative_prompt": sample["negative_prompt"] if body.negative_prompt is None else body.negative_prompt,
            "seed": sample["seed"] if body.seed is None else body.seed, "steps": body.steps or sample["steps"],
            "cfg_scale": sample["cfg_scale"] if body.cfg_scale is None else body.cfg_scale, "sampler": sampler,
            "size": cfg["dataset"]["resolution"]}


def run_grid(store: Store, job: dict, stop_asked: Callable[[], bool]) -> str | None:
    """Render the grid job's cells in turn, an event per cell, and end the job finished (None); when `stop_asked()`
    turns true between two cells, the job is left running and the line saying where it stopped is returned."""
    c, out = job["config"], Path(job["output_dir"])
    lora_dir = Path(c["lora_dir"])
    model = c["model"]
    dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if torch.cuda.is_available() else "fp32"
    pipe = single.open_pipeline(model["checkpoint"] or model["name"], [lora_dir / f"{s}.safetensors" for s in c["epochs"]],
                                lora_dir, dtype=dtype, model_seed=model["seed"], prediction=model["prediction"])
    base = single.settings_for(pipe, c["prompt"], c["negative_prompt"], c["steps"], c["sampler"], c["cfg_scale"], c["seed"],
                               c["size"], c["size"])
    x, y = render.Axis("epoch", tuple(c["epochs"])), render.Axis("strength", tuple(c["strengths"]))
    total, began = len(x.values) * len(y.values), time.monotonic()
    store.add_event(job["id"], {"event": "grid", "epochs": [int(s.rsplit("-", 1)[1]) for s in x.values], "files": list(x.values),
                                "strengths": list(y.values), "total": total}, {"step": 0, "total_steps": total})
    done = 0

    def on_cell(row: int, col: int, s: render.Settings, path: Path, parameters: str) -> None:
        nonlocal done
        done += 1
        rate = done / max(time.monotonic() - began, 1e-9)
        store.add_event(job["id"], {"event": "cell", "row": row, "col": col, "file": x.values[col], "strength": y.values[row],
                                    "tag": TAG.findall(s.prompt)[-1], "path": str(path), "parameters": parameters,
                                    "done": done, "total": total},
                        {"step": done, "total_steps": total, "eta_s": (total - done) / rate})
        if stop_asked() and done < total:
            raise Stopped

    try:
        grid, _ = render.render_grid(pipe, base, x, y, out, on_cell=on_cell)
    except Stopped:
        return f"stopped after {done} of {total} cells; resume renders the grid again"
    store.add_event(job["id"], {"event": "save", "kind": "grid", "path": str(grid)})
    store.end(job["id"], FINISHED, f"wrote {grid.name}")
    return None
