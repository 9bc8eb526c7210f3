"""The one model lookup: what a model name or path given anywhere (model.name, model.checkpoint, --model, a LoRA's
ss_sd_model_name) stands for.

A built-in name (models/configs.py) is that architecture, built at random init; anything else is a checkpoint
source for models/loaders.py: a single file, a diffusers folder, or a Hugging Face Hub repo id already in the local
cache. The lookup reads headers only; `Model.load` reads the weights. Every failure is one CheckpointError line
naming the key or option the source came from and the source itself; an unknown bare name lists the built-ins.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from gesso.models import configs
from gesso.models.configs import ModelConfig
from gesso.models.loaders import CHECKPOINT_EXTENSIONS, Checkpoint, CheckpointError, fill, open_checkpoint
from gesso.models.sd import StableDiffusion, build
from gesso.models.tokenizer import load_tokenizers


@dataclass(frozen=True)
class Model:
    """A model as find_model found it: a built-in architecture (checkpoint None) or an opened checkpoint."""

    name: str  # the built-in name, or the checkpoint's file (or folder) stem: what infotexts call it
    config: ModelConfig
    checkpoint: Checkpoint | None = None

    def load(self, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
             vae_dtype: torch.dtype | None = None) -> StableDiffusion:
        """Its modules, the UNet and text encoders in `dtype`, the VAE in `vae_dtype` (default `dtype`): the
        checkpoint's weights, or the built-in architecture at random init from `seed`."""
        if self.checkpoint is not None:
            return fill(self.checkpoint, dtype, device, vae_dtype)
        sd = build(self.config, seed=seed, device=device)
        for part in (sd.unet, *sd.text_encoders):
            part.to(dtype)
        sd.vae.to(vae_dtype or dtype)  # cast once, from the fp32 it was built in
        return sd

    def tokenizers(self) -> list:
        """One tokenizer per text encoder: a diffusers folder's own, else CLIP's shipped vocabulary."""
        return load_tokenizers(self.config, self.checkpoint.path if self.checkpoint else None)


def _bare_name(text: str) -> bool:
    """A word meant as a built-in name: no checkpoint extension, no path separator, nothing of that name here."""
    return (Path(text).suffix.lower() not in CHECKPOINT_EXTENSIONS and not any(c in text for c in "/\\")
            and not text.startswith((".", "~")) and not Path(text).exists())


def find_model(source: str | Path, key: str = "model", cache_dir=None) -> Model:
    """The model `source` names, `key` being where it was given (model.name, model.checkpoint, --model): a built-in
    name, else a checkpoint (file, diffusers folder, cached Hub id), headers read. Raises CheckpointError naming both."""
    text = str(source)
    if text in configs.REGISTRY:
        return Model(text, configs.REGISTRY[text])
    if _bare_name(text):
        raise CheckpointError(f"{key}: unknown model config {text!r}; built-in: {', '.join(sorted(configs.REGISTRY))}, "
                              "or a checkpoint file, diffusers folder or Hub repo id in the local cache")
    try:
        ckpt = open_checkpoint(source, cache_dir)
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e}") from None
    return Model(Path(text).stem, ckpt.config, ckpt)


def recorded_model(name: str) -> Model | None:
    """The model a LoRA's ss_sd_model_name records, when it is here: a built-in, or a checkpoint file or folder that
    exists and reads; None otherwise (kohya records the file name on the trainer's machine)."""
    if name not in configs.REGISTRY and not (name and Path(name).exists()):
        return None
    try:
        return find_model(name, "ss_sd_model_name")
    except CheckpointError:
        return None
