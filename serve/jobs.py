"""What a client sends and gets, checked here before anything is written: a job's config, and the files a job wrote.

A submitted config is checked as `gesso train` checks one (build_config: every key, type, range and folder), and its
model is looked up (headers only), so a bad config is refused at submit time with the ConfigError's line and the key
it names. The server decides where a job writes: its output folder is `<data>/jobs/<id>/` (output.dir is ignored)
and the dataset cache is `<data>/cache/` (dataset.cache_dir is replaced; the default would write beside the images),
each change said in the job's notices. So the server writes nowhere but its data folder.
"""
import copy
import dataclasses
import re
import tomllib
from dataclasses import fields
from pathlib import Path, PurePosixPath

from gesso.engine.config.load import apply_overrides, build_config
from gesso.engine.config.sections import Config
from gesso.errors import CheckpointError, ConfigError
from gesso.models.lookup import find_model

CACHE_DIR = "cache"
JOBS_DIR = "jobs"
KEY = re.compile(rf"\b(?:{'|'.join(f.name for f in fields(Config))})\.\w+(?:\[\d+\])?(?:\.\w+)?")
SECTION = re.compile(r"\[(\w+)\]")


class RequestError(Exception):
    """A request refused: the HTTP status, one line naming the problem, and the config key or request field it is in."""

    def __init__(self, status: int, message: str, key: str | None = None):
        super().__init__(message)
        self.status, self.message, self.key = status, message, key


def error_key(message: str) -> str | None:
    """The config key a ConfigError's line names (`train.learning_rate`, `dataset.subsets[0].path`), else the section
    (`[train] must be a table`), else None."""
    key = KEY.search(message)
    if key:
        return key.group(0)
    section = SECTION.search(message)
    return section.group(1) if section else None


def check_config(config: str | dict, overrides: list[str], base: str | None, data_dir: Path) -> tuple[dict, list[str]]:
    """The checked config of a submission, as a dict shaped like the TOML (build_config reads it back unchanged in the
    job's process), and the notices of what the server set in it. RequestError for anything that cannot run."""
    if isinstance(config, str):
        try:
            data = tomllib.loads(config)
        except tomllib.TOMLDecodeError as e:
            raise RequestError(400, f"config: not valid TOML ({e})", "config") from None
    else:
        data = copy.deepcopy(config)
    folder = Path(base) if base else Path.cwd()
    if base is not None and not (folder.is_absolute() and folder.is_dir()):
        raise RequestError(422, f"base: {base!r} is not an absolute path to a folder on the server", "base")
    try:
        data = apply_overrides(data, overrides)
    except ConfigError as e:
        raise RequestError(422, f"overrides: {e}", "overrides") from None
    notices = []
    output, dataset = data.get("output"), data.get("dataset")
    if isinstance(output, dict) and output.pop("dir", ""):
        notices.append(f"output.dir is ignored: a job writes to its own folder, {JOBS_DIR}/<id> in the server's data folder")
    if isinstance(dataset, dict):
        if dataset.get("cache_dir"):
            notices.append(f"dataset.cache_dir is replaced by the server's own cache, {CACHE_DIR}/ in its data folder")
        dataset["cache_dir"] = str(data_dir.resolve() / CACHE_DIR)
    try:
        cfg = build_config(data, "config", folder)
        find_model(*cfg.model.source)  # headers only: a missing or unreadable checkpoint is refused now, not in an hour
    except (ConfigError, CheckpointError) as e:
        raise RequestError(422, str(e), error_key(str(e))) from None
    return dataclasses.asdict(cfg), notices


def relative_path(path: str) -> tuple[str, ...]:
    """The parts of a path a client names a job's file by (relative, `/`-separated); RequestError for one that could
    leave the folder (`..`, `.`, absolute, a backslash) or names a hidden file (the lock, temporary files)."""
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or "\\" in path or "\0" in path or any(p in ("..", ".") for p in path.split("/")):
        raise RequestError(400, f"path {path!r}: must name a file inside the job's folder (no '..', '.' or absolute paths)", "path")
    if any(p.startswith(".") for p in parts):
        raise RequestError(404, f"path {path!r}: no such file in the job's folder", "path")
    return parts


def job_file(output_dir: Path, parts: tuple[str, ...]) -> Path:
    """The file `parts` (relative_path's) names in a job's output folder; RequestError when a link leads out of the
    folder or there is no such file."""
    root = output_dir.resolve()
    target = (root / Path(*parts)).resolve()
    name = "/".join(parts)
    if not target.is_relative_to(root):
        raise RequestError(400, f"path {name!r}: leads outside the job's folder", "path")
    if not target.is_file():
        raise RequestError(404, f"path {name!r}: no such file in the job's folder", "path")
    return target


def kind(path: PurePosixPath) -> str:
    """What a job's file is, for a client listing them: lora, preview, state, metrics, tensorboard, log or other."""
    if path.parts[0] == "tensorboard":
        return "tensorboard"
    if path.parts[0] == "samples" and path.suffix == ".png":
        return "preview"
    return {".safetensors": "lora", ".pt": "state", ".jsonl": "metrics", ".log": "log"}.get(path.suffix, "other")


def job_files(output_dir: Path) -> list[dict]:
    """Every file a client may download from a job's folder: path (relative), kind, size in bytes, modified (Unix)."""
    root = output_dir.resolve()
    out = []
    for p in sorted(root.rglob("*")) if root.is_dir() else ():
        rel = PurePosixPath(p.relative_to(root).as_posix())
        if p.is_file() and not p.is_symlink() and not any(part.startswith(".") for part in rel.parts):
            stat = p.stat()
            out.append({"path": str(rel), "kind": kind(rel), "size": stat.st_size, "modified": stat.st_mtime})
    return out
