"""Reading tensors lazily from checkpoint files: safetensors (header first, data memory-mapped) and legacy .ckpt.

Every tensor is a `TensorRef` (shape, dtype, load): names and shapes are known from the header alone, and
the data is read one tensor at a time when the model is filled, so peak host memory stays near one copy.
"""
import json
import pickle
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from gesso.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class TensorRef:
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_safetensors_header(path: Path) -> tuple[dict, dict[str, str]]:
    """The header's tensor entries {name: {dtype, shape, data_offsets}} and its metadata, validated
    against the file size so that a truncated file fails here, before any tensor is read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for name, entry in header.items():
        try:
            end = entry["data_offsets"][1]
            SAFETENSORS_DTYPES[entry["dtype"]]
            tuple(entry["shape"])
        except (KeyError, TypeError, IndexError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from None
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of a {data_size}-byte data section"
            )
    return header, metadata


def safetensors_refs(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    header, metadata = read_safetensors_header(path)
    handle = []  # opened on the first read; closed when the refs are dropped

    def loader(name: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            if not handle:
                handle.append(safe_open(str(path), framework="pt"))
            return handle[0].get_tensor(name)

        return load

    refs = {
        name: TensorRef(tuple(e["shape"]), SAFETENSORS_DTYPES[e["dtype"]], loader(name)) for name, e in header.items()
    }
    return refs, metadata


def _refusal(e: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line. torch's own message spans lines, carries
    terminal escapes and advises loading the file with weights_only=False, which is how a hostile pickle runs code."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if isinstance(e, pickle.UnpicklingError):
        lines = text.partition("WeightsUnpickler error:")[2].strip().splitlines()
        detail = lines[0].split(". ")[0][:160] if lines else e.__class__.__name__
        if "global" in detail.lower():  # a pickle that names a function or class to call
            return f"it holds Python objects besides tensors, which could run code, so it is refused ({detail})"
        return f"not a PyTorch file ({detail})"
    if isinstance(e, EOFError):
        return "it ends before its data does (empty or truncated)"
    if isinstance(e, (PermissionError, IsADirectoryError, FileNotFoundError)):  # other OSErrors come from a damaged zip
        return f"it cannot be read ({e.strerror or e.__class__.__name__})"
    first = text.strip().splitlines()[0].split(". This is an internal")[0][:160] if text.strip() else e.__class__.__name__
    return f"damaged, or not a PyTorch file ({first})"


def load_weights_only(path: Path, mmap: bool = False) -> object:
    """torch.load(path, weights_only=True): tensors and plain data only, never code; memory-mapped when `mmap`
    and the file is a zip (a legacy pickle cannot be). Any failure is one CheckpointError line naming the file."""
    try:
        # torch warns about pickle protocols it does not expect; for a file it then refuses, that is noise around the one line
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file (pickle, zip, EOF, OS, runtime errors)
        raise CheckpointError(f"{path}: not loadable as a weights-only file: {_refusal(e)}") from None


def ckpt_refs(path: Path) -> dict[str, TensorRef]:
    """A legacy pickle checkpoint through torch.load(weights_only=True), memory-mapped when it is a zip file."""
    obj = load_weights_only(path, mmap=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
    return {k: TensorRef(tuple(v.shape), v.dtype, lambda v=v: v) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def file_refs(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Tensors of one weights file: .safetensors, or .ckpt/.pt/.pth/.bin through weights-only torch.load."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return safetensors_refs(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return ckpt_refs(path), {}
    with open(path, "rb") as f:
        start = f.read(9)
    if len(start) == 9 and start[8:9] == b"{":
        return safetensors_refs(path)
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors or .ckpt)")


def sharded_refs(index: Path) -> dict[str, TensorRef]:
    """A sharded component (`*.safetensors.index.json` with a weight_map)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index}: not a sharded-weights index (no weight_map)") from None
    refs = {}
    for shard in sorted(set(weight_map.values())):
        refs.update(file_refs(index.parent / shard)[0])
    return refs
