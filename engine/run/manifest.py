"""Which run a folder holds: `gesso-run.json`, written atomically before the run's first file.

It records the run's name and the config fields that change what is trained, with their sha256 fingerprint, so
that the same command run again after a kill (kill -9, the OOM killer, a notebook that disconnected) before the
run's first state.pt finds its own files and starts the run again, while a different run's files are still
refused, naming the keys that differ. The fingerprint leaves out what only says where, how often and in what
precision files are written, the previews, the cache's place, the device and the memory mode (on another GPU
`train.memory = "auto"` picks another); every other key, `train.epochs` included, is the run.

The file is input like any other: one that is not a JSON object with a fingerprint and a table of fields counts
as absent (the folder's files are then judged as a Gesso without manifests judged them).
"""
import dataclasses
import hashlib
import json
from pathlib import Path

from gesso.engine.config.sections import Config
from gesso.engine.io import write_bytes_atomic

MANIFEST_FILE = "gesso-run.json"
FORMAT = 1
# section -> keys left out of the fingerprint; None: the whole section
NOT_THE_RUN = {
    "output": {"dir", "save_dtype", "save_every_n_epochs", "save_every_n_steps", "save_every_n_minutes", "timed_lora",
               "keep_last", "save_state", "tensorboard"},
    "sample": None,
    "dataset": {"cache_dir"},
    "train": {"device", "memory", "gradient_checkpointing", "fp8_base", "blocks_to_swap"},
}


def run_fields(cfg: Config) -> dict[str, object]:
    """The fingerprinted fields, `section.key` -> value as JSON values (paths as strings)."""
    out = {}
    for section, values in dataclasses.asdict(cfg).items():
        left_out = NOT_THE_RUN.get(section, set())
        if left_out is None:
            continue
        for key, value in values.items():
            if key not in left_out:
                out[f"{section}.{key}"] = json.loads(json.dumps(value, default=str))
    return out


def fingerprint(fields: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: Path, cfg: Config) -> None:
    fields = run_fields(cfg)
    manifest = {"format": FORMAT, "name": cfg.output.name, "fingerprint": fingerprint(fields), "config": fields}
    write_bytes_atomic(folder / MANIFEST_FILE, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None when there is none or it is not one (unreadable, not JSON, fields missing)."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = (isinstance(manifest, dict) and isinstance(manifest.get("fingerprint"), str)
          and isinstance(manifest.get("config"), dict))
    return manifest if ok else None


def differences(manifest: dict, cfg: Config) -> list[str]:
    """The keys whose values differ between the manifest's run and `cfg`'s; [] when they are the same run. A key the
    manifest lacks (one a later Gesso added) counts as set to its default, so an upgrade does not make a run another."""
    fields = run_fields(cfg)
    if manifest["fingerprint"] == fingerprint(fields):
        return []
    recorded, defaults = manifest["config"], run_fields(Config())
    return sorted(k for k, v in fields.items() if v != recorded.get(k, defaults[k]))
