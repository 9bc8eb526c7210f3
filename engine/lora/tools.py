"""LoRA file tools: convert between layouts, bake LoRA into a single-file checkpoint, shrink a LoRA's rank by SVD.

convert_lora, merge_lora and resize_lora are what `gesso convert`, `gesso merge` and `gesso resize` run; bad input
raises LoRAFileError or CheckpointError with one line naming the file.

merge: W += weight * alpha / rank * up @ down for every module of every file, in fp32, written back in the source's
keys and dtypes; tensors are read, changed and written one at a time, so peak memory is about one weight.
resize: the best rank-k approximation of each module's update (Eckart-Young), from the SVD of the r x r core of
up @ down, reporting the fraction of the update's Frobenius norm each module keeps.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from gesso import models
from gesso.engine.io import write_atomic
from gesso.engine.lora import formats as lora_convert
from gesso.engine.lora.files import read_lora_header, save_lora
from gesso.engine.lora.formats import LoRA, Module
from gesso.errors import CheckpointError, LoRAFileError
from gesso.models.configs import ModelConfig
from gesso.models.files import SAFETENSORS_DTYPES, TensorRef

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = ("kohya", "diffusers")


@dataclass(frozen=True)
class Resized:
    name: str
    rank_before: int
    rank_after: int
    retained: float  # ||resized update||_F / ||update||_F


# modelspec.architecture prefixes (kohya's sai_model_spec) -> the full-size config of that family
ARCHITECTURES = (("stable-diffusion-xl-v1", models.configs.SDXL_BASE), ("stable-diffusion-v2", models.configs.SD21),
                 ("stable-diffusion-v1", models.configs.SD15))
PASS_MODEL = "pass --model (model=...) with the architecture it was trained on"


def metadata_config(metadata: dict[str, str]) -> ModelConfig | None:
    """The model a LoRA's metadata names: ss_sd_model_name (a built-in, such as the demo's tiny-sdxl, or a checkpoint
    here), else modelspec.architecture, else ss_base_model_version."""
    named = models.recorded_model(metadata.get("ss_sd_model_name", ""))
    if named is not None:
        return named.config
    architecture, version = metadata.get("modelspec.architecture", ""), metadata.get("ss_base_model_version", "")
    for prefix, cfg in ARCHITECTURES:
        if architecture.startswith(prefix):
            return cfg
    for prefix, cfg in (("sdxl_", models.configs.SDXL_BASE), ("sd_v2", models.configs.SD21), ("sd_v1", models.configs.SD15)):
        if version.startswith(prefix):
            return cfg
    return None


def model_config(path: str | Path, model: str | Path | None = None) -> ModelConfig:
    """The ModelConfig a LoRA file is read against: `model` (a built-in name or a checkpoint), else the model its
    metadata names (metadata_config), else its key names."""
    if model:
        return models.find_model(model, "model").config  # headers only
    keys, metadata = read_lora_header(path)
    cfg = metadata_config(metadata)
    if cfg is not None:
        return cfg
    joined = " ".join(keys)
    if any(s in joined for s in ("lora_te2_", "text_encoder_2.", "input_blocks", "add_embedding")):
        return models.configs.SDXL_BASE
    if any(s in joined for s in ("down_blocks_0_attentions", "down_blocks.0.attentions")):
        return models.configs.SD15
    raise LoRAFileError(f"{path}: cannot tell which model this LoRA is for from its metadata or key names; {PASS_MODEL}")


def read_placed(path: str | Path, model: str | Path | None = None) -> tuple[LoRA, ModelConfig]:
    """Every module of a LoRA file of any layout, each on a weight of the model; the model's config."""
    cfg = model_config(path, model)
    try:
        return lora_convert.require_placed(path, lora_convert.read(path, cfg)), cfg
    except LoRAFileError as e:
        if model:
            raise
        raise LoRAFileError(f"{e} (read as {cfg.name}, guessed from the file); {PASS_MODEL}") from None


def module_count(path: str | Path) -> int:
    """LoRA modules in a file of any layout, from its key names (LoRA: one down weight per module; LyCORIS: one name)."""
    return len({split[0] for key in read_lora_header(path)[0] if (split := lora_convert.split_key(key)) and split[1] != "alpha"})


def convert_lora(src: str | Path, dst: str | Path, to: str = "kohya", model: str | Path | None = None,
                 dtype: str | None = None) -> Path:
    """Rewrite a kohya, diffusers/PEFT or ComfyUI LoRA in the kohya layout (read by ComfyUI, AUTOMATIC1111/Forge and
    diffusers) or in diffusers' own; `dtype` (fp16, bf16, fp32) casts the tensors. Returns `dst`."""
    src, dst = Path(src), Path(dst)
    if to not in LAYOUTS:
        raise LoRAFileError(f"{dst}: layout {to!r} unknown; choose {' or '.join(LAYOUTS)}")
    if dtype is not None and dtype not in DTYPES:
        raise LoRAFileError(f"{dst}: dtype {dtype!r} unknown; choose one of {', '.join(DTYPES)}")
    lo, cfg = read_placed(src, model)
    if dtype:
        lo.modules = {n: m.to(DTYPES[dtype]) for n, m in lo.modules.items()}
    if to == "kohya":
        save_lora(dst, lora_convert.to_kohya(lo), lora_convert.kohya_metadata(lo, cfg.family, dst.stem))
    else:
        # the model's name goes along, so that the tools and `sample` still find the architecture (diffusers ignores it)
        meta = {"format": "pt"} | {k: lo.metadata[k] for k in ("ss_sd_model_name",) if k in lo.metadata}
        write_atomic(dst, lambda tmp: save_file(lora_convert.to_diffusers(lo, cfg), tmp, metadata=meta))
    return dst


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
                      transform=lambda key, t: t, progress: bool = False) -> None:
    """A safetensors file from lazy tensors, each loaded, passed through transform(key, tensor) and written in turn;
    `progress`: a bar over the tensors written."""
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
            for key in tqdm(sorted(entries), desc=f"writing {Path(path).name}", unit="tensor", disable=not progress):
                ref = entries[key]
                t = transform(key, ref.load()).to(ref.dtype).reshape(ref.shape).contiguous()
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    write_atomic(path, write)


def weighted(lora) -> tuple[Path, float]:
    """A LoRA given as a path (weight 1) or as a (path, weight) pair."""
    if isinstance(lora, (str, os.PathLike)):
        return Path(lora), 1.0
    try:
        path, weight = lora
    except (TypeError, ValueError):
        raise LoRAFileError(f"{lora!r}: give a LoRA as a path or a (path, weight) pair") from None
    try:
        return Path(path), float(weight)
    except (TypeError, ValueError):
        raise LoRAFileError(f"{path}: weight {weight!r} is not a number") from None


def merge_lora(checkpoint: str | Path, loras: list, out: str | Path, progress: bool = True) -> dict[str, int]:
    """Write `checkpoint` with every LoRA (a path, or a (path, weight) pair) baked in, as .safetensors at `out`;
    returns modules merged per file. progress: a bar over the checkpoint's tensors as they are written.

    The source must be one file (safetensors or .ckpt): the result has its keys, dtypes and metadata.
    """
    if Path(out).suffix != ".safetensors":
        raise LoRAFileError(f"{out}: the merged checkpoint is written as .safetensors; name it so")
    loras = [weighted(lora) for lora in loras]
    ckpt = models.open_checkpoint(checkpoint)
    if ckpt.kind != "single-file":
        raise CheckpointError(f"{ckpt.path}: merge writes the source's single-file layout; "
                              f"convert this diffusers folder to one file first")
    if not ckpt.comparison.ok:
        raise CheckpointError(f"{ckpt.path}: {ckpt.comparison.first_problem()}")
    by_key: dict[str, list[tuple[lora_convert.Target, Module, float]]] = {}
    counts = {}
    for path, weight in loras:
        named = metadata_config(read_lora_header(path)[1])
        if named is not None and named.family != ckpt.family:  # else a shape error far from the cause
            raise LoRAFileError(f"{path}: a LoRA for {named.family} (its metadata), but {ckpt.path} is {ckpt.family}")
        lo = lora_convert.require_placed(path, lora_convert.read(path, ckpt.config))
        for name, m in lo.modules.items():
            target = lo.layout.targets[name]
            if target.key not in ckpt.tensors:
                raise LoRAFileError(f"{path}: {name} acts on {target.key}, which {ckpt.path} lacks")
            by_key.setdefault(target.key, []).append((target, m, weight))
        counts[str(path)] = len(lo.modules)

    def add(key: str, t: torch.Tensor) -> torch.Tensor:
        if key not in by_key:
            return t
        return lora_convert.add_deltas(t.float(), by_key[key])

    meta = dict(ckpt.metadata)
    meta["gesso_merged_loras"] = json.dumps([{"file": Path(p).name, "weight": w} for p, w in loras])
    write_safetensors(out, ckpt.tensors, meta, add, progress)
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


def resize(lo: LoRA, rank: int | None = None, energy: float | None = None, progress: bool = False) -> tuple[LoRA, list[Resized]]:
    """Each module cut to `rank` (or to the fewest ranks keeping `energy` of its Frobenius norm).

    Every module gets the same alpha (the largest new rank) with alpha / rank folded into its up weight:
    diffusers 0.42 drops per-module alphas of attention modules in kohya files (its alpha_pattern keys miss
    `processor.to_q_lora`), so a file whose alphas differ there loads at the wrong strength in diffusers.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    if rank is not None and rank < 1 or energy is not None and not 0 < energy <= 1:
        raise ValueError(f"rank must be >= 1 and energy in (0, 1], got rank={rank} energy={energy}")
    modules = tqdm(sorted(lo.modules.items()), desc="resizing (SVD)", unit="module", disable=not progress)
    factors = {name: svd_factors(m) for name, m in modules}
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


def resize_lora(src: str | Path, dst: str | Path, rank: int | None = None, energy: float | None = None,
                model: str | Path | None = None, progress: bool = True) -> list[Resized]:
    """Write `src` with each module cut to `rank`, or to the fewest ranks keeping `energy` of its Frobenius norm,
    in the kohya layout at `dst`; returns what each module keeps. progress: a bar over the modules."""
    src, dst = Path(src), Path(dst)
    lo, cfg = read_placed(src, model)
    algos = sorted({m.algo for m in lo.modules.values() if not isinstance(m, Module)})
    if algos:
        raise LoRAFileError(f"{src}: resize cuts LoRA/LoCon ranks by SVD; this file holds {'/'.join(algos)} modules, which it cannot resize")
    try:
        resized, report = resize(lo, rank=rank, energy=energy, progress=progress)
    except ValueError as e:
        raise LoRAFileError(f"{src}: {e}") from None
    save_lora(dst, lora_convert.to_kohya(resized), lora_convert.kohya_metadata(resized, cfg.family, dst.stem))
    return report
