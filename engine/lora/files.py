"""Kohya-layout LoRA files: `<module>.lora_down.weight`, `<module>.lora_up.weight`, `<module>.alpha` (LyCORIS's
DoRA, LoHa and LoKr modules add or swap in their own suffixes, engine/lora/lycoris.py).

This is the layout ComfyUI, AUTOMATIC1111/Forge and diffusers all read. Metadata values are strings;
JSON-valued ones (`ss_tag_frequency`, `ss_dataset_dirs`, ...) are valid JSON, and the `sshs_*` hashes are
what kohya's scripts and AUTOMATIC1111 compute, so the file shows the same hash in every tool.
"""
import hashlib
from pathlib import Path

import torch
from safetensors.torch import save

from gesso.engine.io import write_bytes_atomic
from gesso.errors import LoRAFileError
from gesso.models.files import read_safetensors, read_safetensors_header

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a",
            ".hada_w2_b", ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b")  # LoRA, then LyCORIS's


def weights_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) over the file as saved with its `ss_*` metadata only.

    model hash: sha256 of the bytes after the safetensors header; legacy hash: first 8 hex digits of the
    sha256 of 64 KiB at offset 1 MiB (AUTOMATIC1111's old model hash), as kohya's scripts compute them.
    """
    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors (kohya keys) with metadata, hashes added, atomically."""
    for key in tensors:
        if not key.endswith(SUFFIXES) or "." in key[: -len(next(s for s in SUFFIXES if key.endswith(s)))]:
            raise LoRAFileError(f"{key}: not a kohya LoRA key (module names must not contain dots)")
    metadata = {k: str(v) for k, v in metadata.items()}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = weights_hashes(tensors, metadata)
    blob = save(tensors, metadata)
    assert blob[8:10] == b'{"', "AUTOMATIC1111 requires the header to start with {\""
    write_bytes_atomic(path, blob)


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors LoRA file, or a one-line LoRAFileError."""
    return read_safetensors(path, LoRAFileError)


def read_lora_header(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """Key names and metadata of a safetensors LoRA file without loading its tensors, or a one-line LoRAFileError."""
    header, metadata = read_safetensors_header(Path(path), LoRAFileError)
    return list(header), metadata
