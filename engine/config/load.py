"""Reading a training config: TOML (or a dict shaped like it) into the typed sections, with `section.key=value`
overrides.

Every key is checked: an unknown key, a wrong type, a number out of its range (nan and inf included) or a
missing path fails at once with a one-line ConfigError naming it. Relative dataset paths are resolved against
the config file's folder.
"""
import dataclasses
import math
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from gesso.engine.config.kohya import apply_dataset_config
from gesso.engine.config.sections import CHOICES, RANGES, RELATIONS, Config, TrainSection
from gesso.engine.config.tomlfile import read_toml
from gesso.engine.optim import build_optimizer, optimizer_options
from gesso.engine.sampling.options import split_options
from gesso.errors import ConfigError, PromptError
from gesso.models.loaders import looks_like_path


def _has_nan(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return isinstance(value, float) and math.isnan(value)


def _check_optimizer_args(t: TrainSection, source: str) -> None:
    """optimizer_args before any model loads: each key one the optimizer takes, then its values as the optimizer's own
    constructor judges them, over one stand-in parameter."""
    accepted = optimizer_options(t.optimizer)
    for key, value in t.optimizer_args.items():
        if key not in accepted:
            raise ConfigError(f"{source}: unknown key train.optimizer_args.{key} for optimizer {t.optimizer} (accepted: "
                              f"{', '.join(accepted)}; lr, weight_decay, betas and eps come from their train.* keys)")
        if _has_nan(value):
            raise ConfigError(f"{source}: train.optimizer_args.{key} = {value!r}: must be a number")
    try:
        build_optimizer(t.optimizer, [torch.zeros(1, requires_grad=True)], t.learning_rate, t.weight_decay,
                        (t.adam_beta1, t.adam_beta2), t.adam_epsilon, **t.optimizer_args)
    except (ValueError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ConfigError(f"{source}: train.optimizer_args = {t.optimizer_args!r} refused by {t.optimizer}: {first}") from None


def _check_ranges(cfg: Config, source: str) -> None:
    for section in fields(cfg):
        for f in fields(section.default_factory):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{source}: {section.name}.{f.name} = {value!r}: must be a finite number")
    for (section, key), (ok, rule) in RANGES.items():
        value = getattr(getattr(cfg, section), key)
        if not ok(value):
            raise ConfigError(f"{source}: {section}.{key} = {value!r}: {rule}")
    for keys, ok, rule in RELATIONS:
        if not ok(cfg):
            raise ConfigError(f"{source}: {keys}: {rule}")
    for i, prompt in enumerate(cfg.sample.prompts):  # kohya's --w/--h/--s/... options, before an epoch is spent
        try:
            split_options(prompt)
        except PromptError as e:
            raise ConfigError(f"{source}: sample.prompts[{i}]: {e}") from None
    _check_optimizer_args(cfg.train, source)


def _coerce(where: str, value: Any, typ: type) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


SUBSET_KEYS = {"path": str, "repeats": int, "trigger": str, "class_tokens": str, "is_reg": bool, "alpha_mask": bool,
               "mask_dir": str}


def _subsets(source: str, raw: list, base: Path) -> list[dict]:
    """[[dataset.subsets]] tables, checked key by key, paths resolved against the config's folder."""
    out = []
    for i, table in enumerate(raw):
        where = f"{source}: dataset.subsets[{i}]"
        if not isinstance(table, dict) or "path" not in table:
            raise ConfigError(f"{where}: expected a table with at least a path")
        for key, value in table.items():
            if key not in SUBSET_KEYS:
                raise ConfigError(f"{where}: unknown key {key} (known: {', '.join(SUBSET_KEYS)})")
            _coerce(f"{where}.{key}", value, SUBSET_KEYS[key])
        ok, rule = RANGES[("dataset", "repeats")]
        if not ok(table.get("repeats", 0)):
            raise ConfigError(f"{where}.repeats = {table['repeats']!r}: {rule}")
        resolved = {}
        for key in ("path", "mask_dir"):
            if table.get(key):
                resolved[key] = str(_folder(f"{where}.{key}", base / table[key]))
        out.append({**table, **resolved})
    return out


def _folder(where: str, folder: Path) -> Path:
    folder = folder.resolve()
    if not folder.is_dir():
        raise ConfigError(f"{where}: no such folder: {folder}")
    return folder


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


def build_config(data: dict[str, Any], source: str = "config", base: str | Path | None = None) -> Config:
    """A checked Config from a nested dict shaped like the TOML, with every check load_config makes: unknown sections
    and keys, types, values, ranges and relations, then dataset.path (or dataset.subsets) required and each path
    resolved against `base` (default: the current folder), its folders required to exist. `source` names the
    config in messages."""
    cfg = _typed(data, source)
    return _resolved(cfg, source, Path(base) if base is not None else Path.cwd())


def load_config(path: str | Path, overrides: list[str] = (), dataset_config: str | Path | None = None) -> Config:
    """Read a TOML config, apply `section.key=value` overrides, then build_config with paths relative to the file's
    folder. dataset_config: a kohya dataset TOML whose subsets replace dataset.path and dataset.subsets
    (engine/config/kohya.py), before the overrides."""
    path = Path(path)
    data = read_toml(path)
    if dataset_config:
        data = apply_dataset_config(data, dataset_config)
    return build_config(apply_overrides(data, overrides), str(path), path.parent)


def apply_overrides(data: dict[str, Any], overrides: list[str] = ()) -> dict[str, Any]:
    """`data` (a dict shaped like the TOML, changed in place) with each `section.key=value` set, as --set sets it:
    the value in TOML syntax, a bare word a string. ConfigError for an item that is not section.key=value."""
    for item in overrides:
        section, key, value = _parse_override(item)
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {item}: [{section}] must be a table")
        table[key] = value
    return data


def _typed(data: dict[str, Any], source: str) -> Config:
    """Typed Config from a nested dict, rejecting unknown sections and keys by name, and every value out of its rules."""
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
            value = _coerce(f"{source}: {f.name}.{key}", value, known[key].type)
            allowed = CHOICES.get((f.name, key))
            if allowed and value not in allowed:
                raise ConfigError(f"{source}: {f.name}.{key} = {value!r}, expected one of {', '.join(allowed)}")
            values[key] = value
        sections[f.name] = f.default_factory(**values)
    unknown = set(data) - {f.name for f in fields(Config)}
    if unknown:
        first = sorted(unknown)[0]
        hint = "; a kohya dataset config: pass it as --dataset-config FILE" if first in ("datasets", "general") else ""
        raise ConfigError(f"{source}: unknown section [{first}] (known: {', '.join(f.name for f in fields(Config))}){hint}")
    cfg = Config(**sections)
    _check_ranges(cfg, source)
    return cfg


def _resolved(cfg: Config, source: str, base: Path) -> Config:
    """dataset.path required; dataset, mask and validation folders resolved against `base` and checked, the cache folder and a
    checkpoint path resolved (a Hub repo id stays as it is)."""
    if not cfg.dataset.path and not cfg.dataset.subsets:
        raise ConfigError(f"{source}: dataset.path is required")
    dataset = _folder(f"{source}: dataset.path", base / cfg.dataset.path) if cfg.dataset.path else ""
    mask_dir = str(_folder(f"{source}: dataset.mask_dir", base / cfg.dataset.mask_dir)) if cfg.dataset.mask_dir else ""
    validation_dir = (str(_folder(f"{source}: dataset.validation_dir", base / cfg.dataset.validation_dir))
                      if cfg.dataset.validation_dir else "")
    subsets = _subsets(source, cfg.dataset.subsets, base)
    cache_dir = str((base / cfg.dataset.cache_dir).resolve()) if cfg.dataset.cache_dir else ""
    model = cfg.model
    if model.checkpoint and ((base / model.checkpoint).exists() or looks_like_path(model.checkpoint)):  # else a Hub id
        model = dataclasses.replace(model, checkpoint=str((base / model.checkpoint).resolve()))
    data = dataclasses.replace(cfg.dataset, path=str(dataset), subsets=subsets, cache_dir=cache_dir, mask_dir=mask_dir,
                               validation_dir=validation_dir)
    return dataclasses.replace(cfg, model=model, dataset=data)
