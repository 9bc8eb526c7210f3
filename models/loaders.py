"""Load a checkpoint from any of its sources onto the engine's modules.

Sources: a single file (.safetensors in fp32/fp16/bf16/fp8, or a legacy .ckpt), a diffusers folder (unet/,
vae/, text_encoder/, text_encoder_2/), or a Hugging Face Hub repo id already in the local cache. All of them
become one mapping in the single-file layout, checked key by key and shape by shape against the engine's
definition before any weight is read.
"""
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gesso.models.detect import Comparison, detect_family, is_optional, match_config, with_prediction
from gesso.models.diffusers_format import diffusers_to_original
from gesso.models.files import CheckpointError, TensorRef, file_refs, sharded_refs
from gesso.models.sd import StableDiffusion

__all__ = ["CheckpointError", "Checkpoint", "looks_like_path", "resolve", "open_checkpoint", "load_model", "fill"]

COMPONENT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                   "text_encoder": "model", "text_encoder_2": "model"}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


@dataclass
class Checkpoint:
    path: Path
    kind: str  # "single-file" | "diffusers"
    tensors: dict[str, TensorRef]  # single-file layout
    metadata: dict[str, str]
    family: str
    comparison: Comparison

    @property
    def config(self):
        return self.comparison.config


def looks_like_path(source) -> bool:
    """A checkpoint name meant as a local path: it has a file extension, a separator a Hub id cannot have, or a
    first part that is a local folder. `owner/name` alone (no extension) is a Hub repo id."""
    text = str(source)
    if Path(text).suffix.lower() in CHECKPOINT_EXTENSIONS or text.startswith((".", "/", "~")) or "\\" in text:
        return True
    return not REPO_ID.match(text) or Path(text.split("/")[0]).expanduser().is_dir()


def resolve(source, cache_dir=None) -> Path:
    """A local file or folder as given; otherwise a Hub repo id looked up in the local cache only."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if looks_like_path(source):
        raise CheckpointError(f"no such file: {path.resolve()}")
    from huggingface_hub import snapshot_download  # here, not at the top: it reads HF_HUB_CACHE and HF_HUB_OFFLINE when imported
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(source), cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{source}: not a local path, and not in the Hugging Face cache; download it first "
                              f"with `hf download {source}`") from None


def _component_refs(folder: Path, name: str) -> dict[str, TensorRef]:
    sub, stem = folder / name, COMPONENT_FILES[name]
    for candidate in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.json",
                      f"{stem}.fp16.safetensors.index.json", f"{stem}.bin", f"{stem}.fp16.bin"):
        if (sub / candidate).is_file():
            return sharded_refs(sub / candidate) if candidate.endswith(".json") else file_refs(sub / candidate)[0]
    raise CheckpointError(f"{folder}: diffusers folder without {name}/{stem}.safetensors")


def _diffusers_family(folder: Path) -> str:
    if (folder / "text_encoder_2").is_dir():
        return "sdxl"
    config = folder / "text_encoder" / "config.json"
    act = json.loads(config.read_text()).get("hidden_act") if config.is_file() else None
    return "sd2" if act == "gelu" else "sd15"


def _diffusers_prediction(folder: Path, cfg):
    """The parameterisation a diffusers folder's scheduler/scheduler_config.json names, else the architecture's."""
    config = folder / "scheduler" / "scheduler_config.json"
    try:
        scheduler = json.loads(config.read_text()) if config.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config}: not valid JSON ({e})") from None
    prediction = scheduler.get("prediction_type", cfg.prediction)
    if prediction not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"{config}: prediction_type {prediction!r} is not supported (epsilon, v_prediction)")
    return replace(cfg, prediction=prediction, zero_terminal_snr=bool(scheduler.get("rescale_betas_zero_snr", False)))


def _single_file_in(folder: Path) -> Path | None:
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.ckpt"))
    return files[0] if len(files) == 1 else None


def open_checkpoint(source, cache_dir=None) -> Checkpoint:
    """Resolve, read headers, detect the architecture and compare against the engine's definition.

    Reads no weights. Raises CheckpointError for unreadable files and unsupported architectures; key or shape
    mismatches are reported in `comparison` (load_model refuses them, inspect lists them).
    """
    path = resolve(source, cache_dir)
    if path.is_dir():
        if (path / "unet").is_dir():
            family = _diffusers_family(path)
            parts = {name: _component_refs(path, name) for name in COMPONENT_FILES
                     if name != "text_encoder_2" or family == "sdxl"}
            tensors = diffusers_to_original(parts, family, str(path))
            comparison = match_config(family, tensors)
            comparison.config = _diffusers_prediction(path, comparison.config)
            return Checkpoint(path, "diffusers", tensors, {}, family, comparison)
        single = _single_file_in(path)
        if single is None:
            raise CheckpointError(f"{path}: a folder that is neither a diffusers pipeline nor holds one checkpoint")
        path = single
    tensors, metadata = file_refs(path)
    family = detect_family(tensors, str(path))
    comparison = match_config(family, tensors)
    comparison.config = with_prediction(comparison.config, tensors)
    return Checkpoint(path, "single-file", tensors, metadata, family, comparison)


def load_model(source, dtype: torch.dtype = torch.float32, device="cpu", cache_dir=None,
               vae_dtype: torch.dtype | None = None) -> StableDiffusion:
    """A StableDiffusion filled from `source`, every floating tensor cast to `dtype` (the VAE's to `vae_dtype` when given).

    The model is allocated once, empty, and filled one tensor at a time from the memory-mapped file.
    """
    return fill(open_checkpoint(source, cache_dir), dtype, device, vae_dtype)


@torch.no_grad()
def fill(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device="cpu", vae_dtype: torch.dtype | None = None) -> StableDiffusion:
    """The model of an opened checkpoint, its weights read (load_model's second half, for a checkpoint already opened)."""
    if not ckpt.comparison.ok:
        raise CheckpointError(f"{ckpt.path}: {ckpt.comparison.first_problem()}")
    with torch.device("meta"):
        model = StableDiffusion(ckpt.config)
    model = model.to(dtype)
    if vae_dtype is not None:
        model.vae.to(vae_dtype)
    model = model.to_empty(device=device)
    model.eval().requires_grad_(False)
    for key, target in model.state_dict().items():
        ref = ckpt.tensors.get(key)
        if ref is None or key.endswith("position_ids"):  # merged files often carry float-corrupted position ids
            assert is_optional(key), key
            _fill_default(key, target)
            continue
        value = ref.load()
        if target.is_floating_point() and not value.is_floating_point():
            raise CheckpointError(f"{ckpt.path}: tensor {key!r} is {value.dtype}, expected floating point")
        target.copy_(value.to(target.dtype).reshape(target.shape))
    return model


def _fill_default(key: str, target: torch.Tensor) -> None:
    if key.endswith("position_ids"):
        target.copy_(torch.arange(target.shape[-1]).reshape(target.shape))
    elif key.endswith("logit_scale"):
        target.fill_(4.6052)  # ln(100), open_clip's trained value
    else:
        raise AssertionError(key)
