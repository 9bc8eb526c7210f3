"""Reading tensors from weights files: safetensors (header first, data memory-mapped) and legacy .ckpt.

Every tensor of a checkpoint is a `TensorRef` (shape, dtype, load): names and shapes are known from the header
alone, and the data is read one tensor at a time when the model is filled, so peak host memory stays near one copy.

Every safetensors file Gesso reads (checkpoints, LoRA, embeddings, the cache) goes through the header check and
the reads here: a forged or damaged file is one line of the caller's error type (CheckpointError, LoRAFileError,
...) naming it, never safetensors' own SafetensorError.
"""
import json
import math
import pickle
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors import safe_open

from gesso.errors import CheckpointError, GessoError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER = 100 * 2**20  # safetensors' own limit
T = TypeVar("T")


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


def read_safetensors_header(path: Path, error: type[GessoError] = CheckpointError) -> tuple[dict, dict[str, str]]:
    """The header's tensor entries {name: {dtype, shape, data_offsets}} and its metadata, checked as safetensors
    checks them (a known dtype, a shape whose bytes fill its offsets exactly, the tensors laid end to end over the
    whole data section), so that a forged or truncated file is one `error` line naming the file and the tensor,
    before any tensor is read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise error(f"{path}: {size} bytes, too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise error(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
            raw = f.read(n)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:  # a folder, a file we may not read
        raise error(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: safetensors header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise error(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error(f"{path}: safetensors metadata is not a table of strings")
    data_size, end = size - 8 - n, 0  # end: where the tensors checked so far end
    for name, entry in sorted(header.items(), key=lambda item: _begin(item[1])):
        why = _entry_problem(entry, end)
        if why:
            raise error(f"{path}: tensor {name!r} {why}")
        end = entry["data_offsets"][1]
        if end > data_size:
            raise error(f"{path}: truncated: tensor {name!r} ends at byte {end} of a {data_size}-byte data section")
    if end < data_size:
        raise error(f"{path}: {data_size - end} bytes after the last tensor's data (a damaged or foreign file)")
    return header, metadata


def _begin(entry) -> int:
    """Where a header entry's data begins, to check them in file order; a malformed entry comes first."""
    try:
        begin = entry["data_offsets"][0]
    except (KeyError, TypeError, IndexError):
        return -1
    return begin if _size(begin) else -1


def _size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry_problem(entry, end: int) -> str | None:
    """Why a header entry cannot be read, the tensors before it ending at byte `end`; None if it can."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        return "has a malformed header entry (expected dtype, shape and data_offsets)"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        return f"has dtype {dtype!r}, not one Gesso reads ({', '.join(SAFETENSORS_DTYPES)})"
    if not isinstance(shape, list) or not all(_size(d) for d in shape):
        return f"has shape {shape!r}, not a list of sizes"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_size(o) for o in offsets) or offsets[0] > offsets[1]:
        return f"has data_offsets {offsets!r}, not [begin, end]"
    if offsets[0] != end:
        return f"starts at byte {offsets[0]} of the data, where the tensor before it ends at byte {end} (overlapping or apart)"
    needed = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != needed:
        return f"has shape {shape} of {dtype}, {needed} bytes, in data_offsets of {offsets[1] - offsets[0]} bytes"
    return None


def _mapped(path: Path, error: type[GessoError], read: Callable[[], T]) -> T:
    """read(), with safetensors' own errors (and those of a file changed since its header was checked) as one
    `error` line naming the file."""
    try:
        return read()
    except Exception as e:  # SafetensorError, OSError, and whatever a file replaced under us raises
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise error(f"{path}: not a readable safetensors file ({first})") from None


def read_safetensors(path: str | Path, error: type[GessoError] = CheckpointError) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file and its metadata: the one way Gesso reads a whole safetensors file (LoRA,
    embedding, cache). Any fault of the file is one `error` line naming it: the kind of file the caller reads."""
    path = Path(path)
    _, metadata = read_safetensors_header(path, error)

    def read() -> dict[str, torch.Tensor]:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    return _mapped(path, error, read), metadata


def safetensors_refs(path: Path, error: type[GessoError] = CheckpointError) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Every tensor of a safetensors file as a TensorRef, its header checked now and its data read on demand."""
    header, metadata = read_safetensors_header(path, error)
    handle = []  # opened on the first read; closed when the refs are dropped

    def loader(name: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            if not handle:
                handle.append(_mapped(path, error, lambda: safe_open(str(path), framework="pt")))
            return _mapped(path, error, lambda: handle[0].get_tensor(name))

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
