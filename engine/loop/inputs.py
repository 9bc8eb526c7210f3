"""What a run reads before it touches its output folder: the device, the base model, the resume state and the
dataset, each checked here.

A run checks every input before its folder is refused, locked or changed (engine/run/rundir.py), so a mistyped
model name, a missing checkpoint or dataset folder, a dataset of only broken images or a bad state.pt is reported
as itself, exit 2, and never comes after, or instead of, the refusal of a used folder; nor does `--overwrite`
give up an earlier run for a run that cannot start.
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from gesso import models
from gesso.engine.config.sections import Config
from gesso.engine.data.dataset import Dataset, DatasetOptions, Subset, build_dataset
from gesso.engine.loop.validation import validation_seed
from gesso.engine.memory import memplan
from gesso.engine.run.saving import check_resumable
from gesso.engine.run.state import load_state
from gesso.errors import TrainError
from gesso.kernels import device as gpus


@dataclass(frozen=True)
class Inputs:
    """A run's inputs, found and checked: the config (train.mixed_precision and train.memory = auto resolved for `device`), the base model
    (headers read, weights not yet), the dataset scanned, and the resume state loaded and checked, if any."""

    cfg: Config
    device: torch.device
    model: models.Model
    dataset: Dataset
    state: dict | None = None


def find_inputs(cfg: Config, device: torch.device, resume: str | Path | None = None, processes: int = 1) -> Inputs:
    """Every input of a run on `device`, cheapest first; the first bad one raises its own one-line GessoError."""
    model = models.find_model(*cfg.model.source)  # CheckpointError naming model.name or model.checkpoint
    state = load_resume(resume, cfg, processes) if resume else None
    dataset = load_dataset(cfg)
    cfg = resolve_precision(cfg, device)
    if cfg.train.memory == "auto":
        cfg = auto_memory(cfg, device)
    return Inputs(cfg, device, model, dataset, state)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device = cuda, but no CUDA device is available")
    return torch.device(name)


def load_model(cfg: Config, dtype: torch.dtype = torch.float32, model: models.Model | None = None):
    """The base model, on the CPU, and its tokenizers: `model` (as find_inputs found it), else what the config names:
    a checkpoint (file, diffusers folder, Hub id) when `model.checkpoint` is set, else the built-in architecture
    `model.name` at random init from `model.seed` (models/lookup.py, which raises CheckpointError naming the key).
    The UNet and text encoders come in `dtype`, the VAE in fp32 (SDXL's overflows in fp16)."""
    model = model or models.find_model(*cfg.model.source)
    sd = model.load(dtype, "cpu", seed=cfg.model.seed, vae_dtype=torch.float32)
    return sd, sd.cfg, model.tokenizers()


def load_dataset(cfg: Config) -> Dataset:
    d = cfg.dataset
    # a regularization subset's captions are the class prompt: the dataset's trigger only where the subset names it
    subsets = [Subset(**{"trigger": "" if s.get("is_reg") else d.trigger, "alpha_mask": d.alpha_mask, **s}) for s in d.subsets]
    if d.path:
        subsets.insert(0, Subset(d.path, d.repeats, d.trigger, alpha_mask=d.alpha_mask, mask_dir=d.mask_dir))
    options = DatasetOptions(resolution=d.resolution, bucketing=d.bucketing, min_bucket_side=d.min_bucket_side,
                             max_bucket_side=d.max_bucket_side, random_crop=d.random_crop, flip=d.flip,
                             shuffle_caption=d.shuffle_caption, keep_tokens=d.keep_tokens,
                             caption_dropout_rate=d.caption_dropout_rate, caption_extension=d.caption_extension,
                             seed=cfg.train.seed, masked_loss=cfg.loss.masked, prior_loss_weight=cfg.train.prior_loss_weight,
                             validation_split=d.validation_split, validation_seed=validation_seed(cfg))
    try:
        dataset = build_dataset(subsets, options)
        if d.validation_dir:  # a folder of its own instead of a split
            dataset.held_out = build_dataset([Subset(d.validation_dir, 1, d.trigger)], options).items
    except (ValueError, FileNotFoundError) as e:
        raise TrainError(f"dataset: {e}") from None
    if not dataset.items:
        print(dataset.report(), flush=True)  # what was skipped and why, before the one-line error
        raise TrainError(f"dataset: no trainable images (png, jpg, webp) in {', '.join(str(s.path) for s in subsets)}")
    return dataset


def resolve_precision(cfg: Config, device: torch.device) -> Config:
    """mixed_precision = auto as the device supports it (kernels/device.py); the run, its files and state use the result."""
    chosen = gpus.precision(cfg.train.mixed_precision, device)
    if cfg.train.mixed_precision == "auto" and device.type == "cuda":
        print(f"mixed_precision = auto: {chosen} on {gpus.gpu(device).name}", flush=True)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=chosen))


def auto_memory(cfg: Config, device: torch.device) -> Config:
    free = memplan.free_gib(device)
    chosen, peak = memplan.plan(cfg, free)
    print(memplan.describe(peak, free), flush=True)
    return chosen


def load_resume(folder: str | Path, cfg: Config, processes: int) -> dict:
    try:
        state = load_state(Path(folder))
    except FileNotFoundError as e:
        raise TrainError(str(e)) from None
    check_resumable(state, cfg, processes, Path(folder))
    return state
