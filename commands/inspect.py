"""`gesso inspect PATH`: what a checkpoint or LoRA file holds, from its header alone.

Exit codes: 0 the keys match the engine's definition, 1 they do not, 2 not a readable checkpoint or LoRA.
"""
import re
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from gesso.engine.lora import lycoris
from gesso.models.configs import SD15, SDXL_BASE
from gesso.models.detect import detect_family, expected_shapes, is_lora, is_optional
from gesso.models.files import CheckpointError, file_refs
from gesso.models.loaders import open_checkpoint
from gesso.models.sd import build

UNET_VAE = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}
COMPONENTS = {
    "sdxl": UNET_VAE | {"text_encoder (CLIP-L)": "conditioner.embedders.0.",
                        "text_encoder_2 (OpenCLIP bigG)": "conditioner.embedders.1."},
    "sd15": UNET_VAE | {"text_encoder (CLIP-L)": "cond_stage_model."},
    "sd2": UNET_VAE | {"text_encoder (OpenCLIP H)": "cond_stage_model."},
}
SHOWN = 10  # keys listed per problem kind
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight",
                 *("." + s for s in lycoris.SUFFIXES if s not in ("lora_down.weight", "lora_up.weight", "alpha")))


def _size(path: Path) -> str:
    n = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale / 10:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def _list(out, label: str, items: list[str]) -> None:
    print(f"  {label} ({len(items)}):", file=out)
    for item in items[:SHOWN]:
        print(f"    {item}", file=out)
    if len(items) > SHOWN:
        print(f"    ... and {len(items) - SHOWN} more", file=out)


def inspect_checkpoint(source, out) -> int:
    ckpt = open_checkpoint(source)
    cmp = ckpt.comparison
    print(f"{ckpt.path}", file=out)
    print(f"  format: {ckpt.kind}, {len(ckpt.tensors)} tensors, {_size(ckpt.path)}", file=out)
    markers = [k for k in ("v_pred", "ztsnr") if k in ckpt.tensors]
    ztsnr = ", zero terminal SNR" if cmp.config.zero_terminal_snr else ""
    source = f"marker keys {', '.join(markers)}" if markers else "scheduler config" if ckpt.kind == "diffusers" else "assumed"
    prediction = f"{cmp.config.prediction}{ztsnr} ({source})"
    print(f"  architecture: {ckpt.family} (engine config {cmp.config.name!r}), prediction {prediction}", file=out)
    print(f"  {'component':32} {'tensors':>8} {'parameters':>15}  dtype", file=out)
    for name, prefix in COMPONENTS[ckpt.family].items():
        refs = {k: r for k, r in ckpt.tensors.items() if k.startswith(prefix)}
        params = sum(r.numel() for k, r in refs.items() if not is_optional(k))
        dtypes = "/".join(sorted({str(r.dtype).removeprefix("torch.") for k, r in refs.items() if not is_optional(k)}))
        print(f"  {name:32} {len(refs):>8} {params:>15,}  {dtypes or '-'}", file=out)
    missing_optional = [k for k in expected_shapes(cmp.config.name) if is_optional(k) and k not in ckpt.tensors]
    if cmp.ignored:
        print(f"  ignored ({len(cmp.ignored)}): {', '.join(cmp.ignored[:SHOWN])}", file=out)
    if missing_optional:
        print(f"  optional, absent (defaults used): {', '.join(missing_optional)}", file=out)
    if cmp.ok:
        print(f"  keys: all match the engine's {cmp.config.name} definition", file=out)
        return 0
    print(f"  keys: do NOT match the engine's {cmp.config.name} definition", file=out)
    for label, items in (("missing", cmp.missing), ("unexpected", cmp.unexpected), ("shape mismatch", cmp.mismatched)):
        if items:
            _list(out, label, items)
    return 1


def _kohya_names(family: str) -> set[str]:
    """Module names a kohya LoRA for the engine's full-size `family` model may target."""
    model = build(SDXL_BASE if family == "sdxl" else SD15, device="meta")
    layered = (nn.Linear, nn.Conv2d)
    names = {"lora_unet_" + n.replace(".", "_") for n, m in model.unet.named_modules() if isinstance(m, layered)}
    prefix = "lora_te1_" if family == "sdxl" else "lora_te_"
    names |= {prefix + n.removeprefix("transformer.").replace(".", "_")
              for n, m in model.text_encoders[0].named_modules() if isinstance(m, torch.nn.Linear)}
    if family == "sdxl":
        for i in range(model.cfg.text_encoders[1].layers):
            names |= {f"lora_te2_text_model_encoder_layers_{i}_{s}" for s in
                      ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                       "mlp_fc1", "mlp_fc2")}
    return names


def inspect_lora(path: Path, refs: dict, metadata: dict, out) -> int:
    modules = sorted({k[: -len(s)] for k in refs for s in LORA_SUFFIXES if k.endswith(s)})
    down = {k.removesuffix(".lora_down.weight"): r for k, r in refs.items() if k.endswith(".lora_down.weight")}
    down |= {k.removesuffix(".lora_A.weight"): r for k, r in refs.items() if k.endswith(".lora_A.weight")}
    down |= {k.removesuffix(".hada_w1_b"): r for k, r in refs.items() if k.endswith(".hada_w1_b")}
    ranks = Counter(r.shape[0] for r in down.values())
    ranks.update(r.shape[1] for k, r in refs.items() if k.endswith(".lokr_w2_a"))  # LoKr's factorised half
    alphas = Counter(round(float(refs[m + ".alpha"].load()), 6) for m in modules if m + ".alpha" in refs)
    print(f"{path}", file=out)
    algos = Counter("dora" if m + ".dora_scale" in refs else "loha" if m + ".hada_w1_a" in refs else
                    "lokr" if any(m + "." + s in refs for s in ("lokr_w1", "lokr_w1_a")) else "lora" for m in modules)
    print(f"  format: LoRA, {len(modules)} modules, {len(refs)} tensors, {_size(path)}", file=out)
    if set(algos) != {"lora"}:  # LyCORIS's modules (engine/lora/lycoris.py), by the tensors each holds
        print(f"  adapters: {', '.join(f'{a} {n}' for a, n in sorted(algos.items()))}", file=out)
    print(f"  rank: {dict(sorted(ranks.items()))}  alpha: {dict(sorted(alphas.items())) or 'none (scale 1)'}", file=out)
    groups = Counter(re.match(r"(lora_unet|lora_te\d?|[^.]+)", m)[1] for m in modules)
    kinds = Counter(re.sub(r".*?(attn\d_to_\w+|ff_net_\d_proj|ff_net_2|proj_in|proj_out|self_attn_\w+|mlp_\w+|"
                           r"in_layers_2|out_layers_3|emb_layers_1|skip_connection|op|conv)$", r"\1", m)
                    for m in modules)
    print(f"  targets: {dict(groups)}", file=out)
    print(f"  module kinds: {dict(sorted(kinds.items()))}", file=out)
    for key in sorted(metadata):
        if key.startswith(("ss_", "modelspec.", "sshs_")):
            value = metadata[key]
            print(f"  {key} = {value if len(value) <= 200 else value[:200] + '...'}", file=out)
    kohya = [m for m in modules if m.startswith(("lora_unet_", "lora_te"))]
    family = "sdxl" if metadata.get("ss_base_model_version", "").startswith("sdxl") or any(
        m.startswith("lora_te2_") for m in kohya) else "sd15"
    if family == "sd15" and any(m.startswith("lora_unet_") for m in kohya):
        print("  module names: SD 1.x kohya LoRAs use diffusers' UNet names; not checked", file=out)
        return 0
    unknown = sorted(set(kohya) - _kohya_names(family)) + [m for m in modules if m not in kohya]
    if unknown:
        print(f"  module names: do NOT all match the engine's {family} model", file=out)
        _list(out, "unknown modules", unknown)
        return 1
    print(f"  module names: all match the engine's {family} model", file=out)
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="what a checkpoint or LoRA file holds (reads only the header)",
                              description="Detected architecture, parameter counts and dtypes, missing or unexpected keys; "
                                          "for a LoRA, rank, alpha, targets and metadata. Exit 1 when keys do not match, "
                                          "2 when unreadable.")
    p.add_argument("path", help="a .safetensors/.ckpt file, a diffusers folder or a cached Hub repo id")
    p.set_defaults(run=lambda args: inspect_main(args.path))


def inspect_main(path, out=None) -> int:
    """Print what PATH holds; return the exit code (0 match, 1 keys differ, 2 unreadable or unsupported)."""
    out = out or sys.stdout
    try:
        p = Path(path)
        if p.is_file():
            refs, metadata = file_refs(p)
            if is_lora(refs):
                return inspect_lora(p, refs, metadata, out)
            detect_family(refs, str(p))
        return inspect_checkpoint(path, out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
