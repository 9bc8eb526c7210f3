"""Training configuration: typed, frozen sections read from TOML, with `section.key=value` overrides.

Every key is checked: an unknown key, a wrong type or a missing path fails at once with a one-line
ConfigError naming it. Relative dataset paths are resolved against the config file's folder.
"""
import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A bad config key or value; the message is one line naming the file and key."""


@dataclass(frozen=True)
class ModelSection:
    name: str = "tiny-sdxl"  # built-in architecture: tiny-sdxl (random init), sdxl, sd15
    checkpoint: str = ""  # single file, diffusers folder or Hub repo id; empty: random init of `name`
    seed: int = 0  # seed of the random init when no checkpoint is given


@dataclass(frozen=True)
class DatasetSection:
    path: str = ""  # folder of images with same-named .txt captions
    trigger: str = ""  # prepended to every caption that lacks it
    repeats: int = 1  # times each image is seen per epoch
    resolution: int = 1024  # square training size in pixels (multiple of 64)
    caption_extension: str = ".txt"


@dataclass(frozen=True)
class NetworkSection:
    rank: int = 16  # LoRA dim
    alpha: float = 16.0  # scale = alpha / rank


@dataclass(frozen=True)
class TrainSection:
    epochs: int = 10
    batch_size: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    seed: int = 42  # seeds data order, timesteps and noise
    device: str = "auto"  # auto (cuda when present), cpu, cuda


@dataclass(frozen=True)
class OutputSection:
    name: str = "lora"  # files are <name>-000001.safetensors per epoch and <name>.safetensors
    dir: str = ""  # empty: output/<name> under the current directory
    save_dtype: str = "fp16"  # fp16, bf16 or fp32
    save_every_n_epochs: int = 1


@dataclass(frozen=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    dataset: DatasetSection = field(default_factory=DatasetSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)


CHOICES = {
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("output", "save_dtype"): ("fp16", "bf16", "fp32"),
}


def _coerce(where: str, value: Any, typ: type) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


def _parse_override(item: str) -> tuple[str, str, Any]:
    key, sep, raw = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot:
        raise ConfigError(f"--set {item}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings: --set output.name=mylora
    return section, name.strip(), value


def build_config(data: dict[str, Any], source: str = "config") -> Config:
    """Typed Config from a nested dict, rejecting unknown sections and keys by name."""
    sections = {}
    for f in fields(Config):
        raw = data.get(f.name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: [{f.name}] must be a table")
        known = {sf.name: sf for sf in fields(f.default_factory)}
        values = {}
        for key, value in raw.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key {f.name}.{key} (known: {', '.join(known)})")
            value = _coerce(f"{source}: {f.name}.{key}", value, type(known[key].default))
            allowed = CHOICES.get((f.name, key))
            if allowed and value not in allowed:
                raise ConfigError(f"{source}: {f.name}.{key} = {value!r}, expected one of {', '.join(allowed)}")
            values[key] = value
        sections[f.name] = f.default_factory(**values)
    unknown = set(data) - {f.name for f in fields(Config)}
    if unknown:
        raise ConfigError(f"{source}: unknown section [{sorted(unknown)[0]}] (known: {', '.join(f.name for f in fields(Config))})")
    return Config(**sections)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a TOML config, apply `section.key=value` overrides, resolve and check paths."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    for item in overrides:
        section, key, value = _parse_override(item)
        data.setdefault(section, {})[key] = value
    cfg = build_config(data, str(path))
    if not cfg.dataset.path:
        raise ConfigError(f"{path}: dataset.path is required")
    dataset = (path.parent / cfg.dataset.path).resolve()
    if not dataset.is_dir():
        raise ConfigError(f"{path}: dataset.path: no such folder: {dataset}")
    checks = [
        (cfg.dataset.resolution % 64 == 0 and cfg.dataset.resolution > 0, "dataset.resolution must be a positive multiple of 64"),
        (cfg.dataset.repeats >= 1, "dataset.repeats must be at least 1"),
        (cfg.network.rank >= 1, "network.rank must be at least 1"),
        (cfg.train.epochs >= 1, "train.epochs must be at least 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be at least 1"),
        (cfg.output.save_every_n_epochs >= 1, "output.save_every_n_epochs must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{path}: {message}")
    return dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, path=str(dataset)))
