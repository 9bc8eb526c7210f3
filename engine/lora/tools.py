"""Bake LoRA into a single-file checkpoint, and shrink a LoRA's rank by SVD.

merge: W += weight * alpha / rank * up @ down for every module of every file, in fp32, written back in the source's
keys and dtypes; tensors are read, changed and written one at a time, so peak memory is about one weight.
resize: the best rank-k approximation of each module's update (Eckart-Young), from the SVD of the r x r core of
up @ down, reporting the fraction of the update's Frobenius norm each module keeps.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gesso import models
from gesso.engine.io import write_atomic
from gesso.engine.lora import formats as lora_convert
from gesso.engine.lora.formats import LoRA, Module
from gesso.models.files import SAFETENSORS_DTYPES, TensorRef

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class Resized:
    name: str
    rank_before: int
    rank_after: int
    retained: float  # ||resized update||_F / ||update||_F


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """`path[:weight]`; a colon followed by something that is not a number belongs to the path."""
    head, sep, tail = arg.rpartition(":")
    if sep:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(arg), 1.0


def write_safetensors(path: str | Path, entries: dict[str, TensorRef], metadata: dict[str, str],
                      transform=lambda key, t: t) -> None:
    """A safetensors file from lazy tensors, each loaded, passed through transform(key, tensor) and written in turn."""
    header, offset = {}, 0
    for key in sorted(entries):
        ref = entries[key]
        size = ref.numel() * torch.empty((), dtype=ref.dtype).element_size()
        header[key] = {"dtype": DTYPE_NAMES[ref.dtype], "shape": list(ref.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps({"__metadata__": metadata, **header} if metadata else header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for key in sorted(entries):
                ref = entries[key]
                t = transform(key, ref.load()).to(ref.dtype).reshape(ref.shape).contiguous()
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    write_atomic(path, write)


def merge(checkpoint, loras: list[tuple[Path, float]], out: str | Path) -> dict[str, int]:
    """Write `checkpoint` with every (LoRA file, weight) baked in; returns modules merged per file.

    The source must be one file (safetensors or .ckpt): the result has its keys, dtypes and metadata.
    """
    ckpt = models.open_checkpoint(checkpoint)
    if ckpt.kind != "single-file":
        raise models.CheckpointError(f"{ckpt.path}: merge writes the source's single-file layout; "
                                     f"convert this diffusers folder to one file first")
    if not ckpt.comparison.ok:
        raise models.CheckpointError(f"{ckpt.path}: {ckpt.comparison.first_problem()}")
    by_key: dict[str, list[tuple[lora_convert.Target, Module, float]]] = {}
    counts = {}
    for path, weight in loras:
        lo = lora_convert.require_placed(path, lora_convert.read(path, ckpt.config))
        for name, m in lo.modules.items():
            target = lo.layout.targets[name]
            if target.key not in ckpt.tensors:
                raise lora_convert.LoRAFileError(f"{path}: {name} acts on {target.key}, which {ckpt.path} lacks")
            by_key.setdefault(target.key, []).append((target, m, weight))
        counts[str(path)] = len(lo.modules)

    def add(key: str, t: torch.Tensor) -> torch.Tensor:
        if key not in by_key:
            return t
        w = t.float()
        for target, m, weight in by_key[key]:
            rows = slice(*target.rows) if target.rows else slice(None)
            w[rows] += weight * m.delta(target.shape).reshape(w[rows].shape)
        return w

    meta = dict(ckpt.metadata)
    meta["gesso_merged_loras"] = json.dumps([{"file": Path(p).name, "weight": w} for p, w in loras])
    write_safetensors(out, ckpt.tensors, meta, add)
    return counts


def svd_factors(m: Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out, r), S (r,), Vh (r, fan_in) with U diag(S) Vh = alpha / rank * up @ down, in float64."""
    up, down = m.up.flatten(1).double(), m.down.flatten(1).double()
    qu, ru = torch.linalg.qr(up)  # (out, r), (r, r)
    qd, rd = torch.linalg.qr(down.T)  # (fan_in, r), (r, r)
    u, s, vh = torch.linalg.svd((m.alpha / m.rank) * ru @ rd.T)
    return qu @ u, s, vh @ qd.T


def kept_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return max(1, min(rank, len(s)))
    total = s.square().sum()
    if total == 0:
        return 1
    fraction = (s.square().cumsum(0) / total).sqrt()
    return int((fraction < energy - 1e-12).sum().item()) + 1


def resize(lo: LoRA, rank: int | None = None, energy: float | None = None) -> tuple[LoRA, list[Resized]]:
    """Each module cut to `rank` (or to the fewest ranks keeping `energy` of its Frobenius norm).

    Every module gets the same alpha (the largest new rank) with alpha / rank folded into its up weight:
    diffusers 0.42 drops per-module alphas of attention modules in kohya files (its alpha_pattern keys miss
    `processor.to_q_lora`), so a file whose alphas differ there loads at the wrong strength in diffusers.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    if rank is not None and rank < 1 or energy is not None and not 0 < energy <= 1:
        raise ValueError(f"rank must be >= 1 and energy in (0, 1], got rank={rank} energy={energy}")
    factors = {name: svd_factors(m) for name, m in sorted(lo.modules.items())}
    kept = {name: kept_rank(s, rank, energy) for name, (_, s, _) in factors.items()}
    alpha = float(max(kept.values()))
    modules, report = {}, []
    for name, (u, s, vh) in factors.items():
        m, k = lo.modules[name], kept[name]
        root = s[:k].sqrt()
        up = (u[:, :k] * root * (k / alpha)).reshape(m.up.shape[0], k, *m.up.shape[2:])
        down = (root[:, None] * vh[:k]).reshape(k, *m.down.shape[1:])
        modules[name] = Module(down.to(m.down.dtype), up.to(m.up.dtype), alpha)
        norm = s.norm().item()
        report.append(Resized(name, m.rank, k, s[:k].norm().item() / norm if norm else 1.0))
    meta = {k: v for k, v in lo.metadata.items() if k not in ("ss_network_dim", "ss_network_alpha")}
    return LoRA(modules, meta, lo.layout), report


def summary(report: list[Resized]) -> str:
    retained = [r.retained for r in report]
    ranks = [r.rank_after for r in report]
    return (f"{len(report)} modules, rank {min(ranks)}..{max(ranks)}, retained Frobenius norm "
            f"min {min(retained):.4f} mean {sum(retained) / len(retained):.4f}")
