"""kohya's dataset config (sd-scripts' `--dataset_config` TOML) read as Gesso's [dataset] section.

    [general]                       options for every dataset and subset
    [[datasets]]                    resolution, buckets, batch size, and subset options for its subsets
      [[datasets.subsets]]          image_dir (required), num_repeats, class_tokens, and subset options

As in sd-scripts (docs/config_README-en.md, library/config_util.py), an option set lower wins: a subset's over
its dataset's over [general]'s. Each kohya key is a row of ROWS. Gesso keeps some options per subset (its folder,
repeats, class tokens) and the rest once per run: those must come out equal for every subset (or dataset), else
the file is refused naming the key, since training them alike would change what trains. Every key is known: a
key kohya does not have is refused as a typo (kohya refuses it too). Gesso lacks some kohya options; each one set
to anything but kohya's default is one warning line naming it, or an error where ignoring it would train
something else (fine-tuning metadata captions). Regularization subsets (is_reg) and masks (alpha_mask, and
conditioning_data_dir as kohya's masked loss reads it) map to Gesso's own keys; a mask turns loss.masked on, as
kohya masks whenever one is given.

Paths are read as kohya reads them, relative to the current folder. Options the file leaves out keep the Gesso
config's values; the file's subsets replace the config's dataset.path and dataset.subsets.
"""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gesso.engine.config.tomlfile import read_toml
from gesso.errors import ConfigError

log = logging.getLogger("gesso.kohya")


@dataclass(frozen=True)
class Row:
    kohya: str  # the key as kohya's TOML spells it
    gesso: str | None  # "subset.<key>" (per folder), "dataset.<key>" or "train.<key>" (once per run); None: not in Gesso
    level: str  # "subset": [general], [[datasets]] or [[datasets.subsets]]; "dataset": [general] or [[datasets]];
    #             "folder": [[datasets.subsets]] only
    kind: type | tuple = object  # the TOML type(s) kohya takes
    default: Any = None  # kohya's default: an unsupported key at this value changes nothing
    refuse: str = ""  # unsupported, and at another value it trains something else: why, for the error
    note: str = ""  # unsupported: what Gesso does instead, for the warning


NUMBER = (int, float)
ROWS = (
    Row("image_dir", "subset.path", "folder", str),
    Row("num_repeats", "subset.repeats", "subset", int, 1),
    Row("class_tokens", "subset.class_tokens", "subset", str, ""),
    Row("caption_extension", "dataset.caption_extension", "subset", str, ".caption"),
    Row("keep_tokens", "dataset.keep_tokens", "subset", int, 0),
    Row("shuffle_caption", "dataset.shuffle_caption", "subset", bool, False),
    Row("flip_aug", "dataset.flip", "subset", bool, False),
    Row("random_crop", "dataset.random_crop", "subset", bool, False),
    Row("caption_dropout_rate", "dataset.caption_dropout_rate", "subset", NUMBER, 0.0),
    Row("resolution", "dataset.resolution", "dataset", (int, list)),
    Row("enable_bucket", "dataset.bucketing", "dataset", bool, False),
    Row("min_bucket_reso", "dataset.min_bucket_side", "dataset", int, 256),
    Row("max_bucket_reso", "dataset.max_bucket_side", "dataset", int, 1024),
    Row("batch_size", "train.batch_size", "dataset", int, 1),
    Row("bucket_reso_steps", None, "dataset", int, 64, note="Gesso's bucket sides are multiples of 64"),
    Row("bucket_no_upscale", None, "dataset", bool, False, note="small images are upscaled into their bucket"),
    Row("network_multiplier", None, "dataset", NUMBER, 1.0, note="the LoRA trains at multiplier 1"),
    Row("validation_seed", "dataset.validation_seed", "dataset", int, 0),
    Row("validation_split", "dataset.validation_split", "dataset", NUMBER, 0.0),
    Row("debug_dataset", None, "dataset", bool, False),
    Row("max_token_length", None, "dataset", int, None, note="captions past 75 tokens are encoded in 75-token chunks"),
    Row("prior_loss_weight", "train.prior_loss_weight", "dataset", NUMBER, 1.0),
    Row("color_aug", None, "subset", bool, False, note="no colour augmentation"),
    Row("face_crop_aug_range", None, "subset", list, None, note="no face crops"),
    Row("caption_prefix", None, "subset", str, None, note="captions train as written (dataset.trigger prepends a word)"),
    Row("caption_suffix", None, "subset", str, None, note="captions train as written"),
    Row("caption_separator", None, "subset", str, ",", note="tags are separated by commas"),
    Row("keep_tokens_separator", None, "subset", str, "", note="keep_tokens counts tags from the start"),
    Row("secondary_separator", None, "subset", str, None, note="tags are separated by commas"),
    Row("enable_wildcard", None, "subset", bool, False, note="the first caption line trains, {a|b} as written"),
    Row("token_warmup_min", None, "subset", int, 1, note="whole captions from the first step"),
    Row("token_warmup_step", None, "subset", NUMBER, 0, note="whole captions from the first step"),
    Row("caption_dropout_every_n_epochs", None, "subset", int, 0, note="use caption_dropout_rate"),
    Row("caption_tag_dropout_rate", None, "subset", NUMBER, 0.0, note="no tag dropout"),
    Row("custom_attributes", None, "subset", dict, None),
    Row("resize_interpolation", None, "subset", str, None, note="images are resized with Lanczos"),
    Row("cache_info", None, "subset", bool, False, note="Gesso caches latents and text by content"),
    Row("alpha_mask", "subset.alpha_mask", "subset", bool, False),  # kohya masks by it even without masked_loss
    Row("is_reg", "subset.is_reg", "folder", bool, False),
    Row("metadata_file", None, "folder", str, None, refuse="fine-tuning subsets (captions from a metadata JSON) are not "
                                                           "supported; use caption files beside the images"),
    Row("conditioning_data_dir", "subset.mask_dir", "folder", str, None),  # with masked loss, kohya's mask images
)
BY_KEY = {row.kohya: row for row in ROWS}
PLACES = {"dataset": "[general] or [[datasets]]", "folder": "[[datasets.subsets]]"}
LEVELS = {"general": ("subset", "dataset"), "datasets": ("subset", "dataset"), "subsets": ("subset", "folder")}


def _table(where: str, table: Any, level: str) -> dict:
    """A table's kohya keys, each checked against its row: known, allowed at this level, of kohya's type."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    for key, value in table.items():
        if key == "subsets" and level == "datasets":
            continue
        row = BY_KEY.get(key)
        if row is None:
            raise ConfigError(f"{where}.{key}: not a kohya dataset option (known: {', '.join(BY_KEY)})")
        if row.level not in LEVELS[level]:
            raise ConfigError(f"{where}.{key}: kohya takes it only in {PLACES[row.level]}")
        if isinstance(value, bool) and row.kind is not bool or not isinstance(value, row.kind):
            raise ConfigError(f"{where}.{key} = {value!r}: expected {getattr(row.kind, '__name__', 'a number')}")
    return table


def _side(where: str, value: int | list) -> int:
    if isinstance(value, list):
        if len(value) != 2 or len(set(value)) != 1 or not all(isinstance(v, int) for v in value):
            raise ConfigError(f"{where} = {value!r}: Gesso's buckets hold resolution x resolution pixels; give one side")
        return value[0]
    return value


def _one_value(source: str, row: Row, values: list[tuple[str, Any]]) -> Any:
    """The value every subset (or dataset) has for an option Gesso applies to the whole run."""
    distinct = {repr(v): (where, v) for where, v in values}
    if len(distinct) > 1:
        (w1, v1), (w2, v2) = list(distinct.values())[:2]
        raise ConfigError(f"{source}: {row.kohya} is {v1!r} in {w1} but {v2!r} in {w2}: Gesso applies one "
                          f"{row.gesso} to every subset; make them equal or train them in separate runs")
    return values[0][1]


def read_dataset_config(path: str | Path) -> dict[str, dict]:
    """{"dataset": {...}, "train": {...}}: Gesso keys from a kohya dataset TOML, warnings logged one line each."""
    path = Path(path)
    data = read_toml(path, "dataset config file")
    unknown = sorted(set(data) - {"general", "datasets"})
    if unknown:
        raise ConfigError(f"{path}: [{unknown[0]}] is not a kohya dataset config section (known: [general], [[datasets]])")
    general = _table(f"{path}: general", data.get("general", {}), "general")
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise ConfigError(f"{path}: no [[datasets]] with [[datasets.subsets]] in it")
    effective: dict[str, list[tuple[str, Any]]] = {row.kohya: [] for row in ROWS}  # per subset or dataset, lowest wins
    given: set[str] = set()  # keys the file sets anywhere
    subsets = []
    for i, raw in enumerate(datasets):
        dataset = _table(f"{path}: datasets[{i}]", raw, "datasets")
        if not dataset.get("subsets"):
            raise ConfigError(f"{path}: datasets[{i}] has no [[datasets.subsets]]")
        for row in ROWS:
            if row.level == "dataset":
                effective[row.kohya].append((f"datasets[{i}]", dataset.get(row.kohya, general.get(row.kohya, row.default))))
        given |= set(general) | set(dataset) - {"subsets"}
        for j, table in enumerate(dataset["subsets"]):
            where = f"datasets[{i}].subsets[{j}]"
            table = _table(f"{path}: {where}", table, "subsets")
            given |= set(table)
            values = {row.kohya: table.get(row.kohya, dataset.get(row.kohya, general.get(row.kohya, row.default)))
                      for row in ROWS if row.level != "dataset"}
            for key, value in values.items():
                effective[key].append((where, value))
            subsets.append(_subset(path, where, values))
    if "enable_bucket" in given:  # kohya's buckets then span its own side limits, 256 to 1024, unless the file says
        given |= {"min_bucket_reso", "max_bucket_reso"}
    out: dict[str, dict] = {"dataset": {"subsets": subsets}, "train": {}, "loss": {}}
    if any(s.get("alpha_mask") or s.get("mask_dir") for s in subsets):  # kohya applies masks whenever they are given
        out["loss"]["masked"] = True
    for row in ROWS:
        if row.kohya not in given:
            continue
        values = effective[row.kohya]
        if row.gesso is None:
            _unsupported(path, row, values)
        elif not row.gesso.startswith("subset."):
            section, key = row.gesso.split(".")
            value = _one_value(str(path), row, values)
            out[section][key] = _side(f"{path}: resolution", value) if row.kohya == "resolution" else value
    return out


def _subset(path: Path, where: str, values: dict) -> dict:
    """One [[dataset.subsets]] table of Gesso's: the folder (resolved as kohya resolves it), repeats, class tokens."""
    if values["image_dir"] is None:
        if values["metadata_file"] is not None:
            raise ConfigError(f"{path}: {where}.metadata_file: {BY_KEY['metadata_file'].refuse}")
        raise ConfigError(f"{path}: {where}: image_dir is required")
    folder = Path(values["image_dir"]).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"{path}: {where}.image_dir: no such folder: {folder}")
    subset = {"path": str(folder), "repeats": values["num_repeats"]}
    subset |= {key: True for key in ("is_reg", "alpha_mask") if values[key]}
    if values["conditioning_data_dir"] is not None:
        subset["mask_dir"] = str(Path(values["conditioning_data_dir"]).expanduser().resolve())
    return subset | ({"class_tokens": values["class_tokens"]} if values["class_tokens"] else {})


def _unsupported(path: Path, row: Row, values: list[tuple[str, Any]]) -> None:
    changed = [(where, v) for where, v in values if v != row.default]
    if not changed:
        return
    where, value = changed[0]
    if row.refuse:
        raise ConfigError(f"{path}: {where}.{row.kohya} = {value!r}: {row.refuse}")
    log.warning("%s: %s = %r (%s) is not supported by Gesso and is ignored%s", path, row.kohya, value, where,
                f": {row.note}" if row.note else "")


def apply_dataset_config(data: dict, path: str | Path) -> dict:
    """A Gesso config's tables with the kohya file's dataset in place of its dataset.path and dataset.subsets."""
    converted = read_dataset_config(path)
    dataset = {k: v for k, v in data.get("dataset", {}).items() if k not in ("path", "subsets", "repeats")}
    return {**data, "dataset": dataset | converted["dataset"], "train": data.get("train", {}) | converted["train"],
            "loss": data.get("loss", {}) | converted["loss"]}
