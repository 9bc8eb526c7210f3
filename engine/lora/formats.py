"""Read any common LoRA layout onto the engine's models, and write the kohya or the diffusers layout.

Read: kohya/AUTOMATIC1111 (`lora_unet_*`, `lora_te1_*`, `lora_te2_*`, `lora_te_*` with `.lora_down/.lora_up/.alpha`,
UNet modules in the original or the diffusers spelling, LoCon convs), diffusers/PEFT (`unet.down_blocks...lora_A.weight`,
`...lora.down.weight`, the old `processor.to_q_lora.down.weight`, `text_encoder(_2).`, PEFT's `lora_adapter_metadata`
alphas) and ComfyUI-saved files (`diffusion_model.<original path>.lora_up.weight`); LyCORIS's DoRA (`dora_scale`), LoHa
(`hada_*`) and LoKr (`lokr_*`) modules under any of those names become `lycoris.Adapter`s. Every module lands on one weight
of the single-file checkpoint (`Target`); OpenCLIP's q/k/v land on row slices of the fused `in_proj_weight`.
"""
import json
import math
import time
from dataclasses import dataclass, field

import torch

from gesso.engine.lora import lycoris, names
from gesso.engine.lora.files import LoRAFileError, read_lora
from gesso.models.configs import CLIPTextConfig, ModelConfig, UNetConfig

# the family keys AUTOMATIC1111 and ComfyUI sort LoRA by, written into our files and converted ones (kohya's values)
BASE_MODEL_VERSION = {"sdxl": "sdxl_base_v1-0", "sd15": "sd_v1", "sd2": "sd_v2"}
MODELSPEC_ARCHITECTURE = {"sdxl": "stable-diffusion-xl-v1-base/lora", "sd15": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2/lora"}

PARTS = (  # file key suffix -> part, longest first so `_lora.down.weight` never shadows `.lora.down.weight`
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"), ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
) + tuple(("." + key, key) for key in (*lycoris.KEYS, *lycoris.TUCKER) if not key.startswith("lora_"))
TEXT_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
OPENCLIP_LINEARS = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


@dataclass(frozen=True)
class Target:
    """Where one LoRA module acts: a weight of the single-file checkpoint, or rows of it."""

    key: str  # e.g. model.diffusion_model.input_blocks.4.1.proj_in.weight
    shape: tuple[int, ...]  # of the weight, or of its rows
    rows: tuple[int, int] | None = None  # q/k/v rows of OpenCLIP's fused in_proj_weight
    unet_path: str | None = None  # module path in the engine's UNet, for injection


@dataclass
class Module:
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: tuple[int, ...], base: torch.Tensor | None = None) -> torch.Tensor:
        """alpha / rank * up @ down in fp32, shaped like the weight it adds to (`base` is for DoRA's sake; unused)."""
        return (self.alpha / self.rank) * (self.up.flatten(1).float() @ self.down.flatten(1).float()).reshape(shape)

    def to(self, dtype: torch.dtype) -> "Module":
        return Module(self.down.to(dtype), self.up.to(dtype), self.alpha)


@dataclass
class Layout:
    """A model's LoRA targets by kohya name (as kohya writes them) and every other spelling of each name."""

    family: str
    targets: dict[str, Target]
    aliases: dict[str, str]  # any accepted `lora_...` underscore name -> kohya name
    te_prefixes: dict[str, str]  # diffusers component ("text_encoder", "text_encoder_2") -> kohya prefix


@dataclass
class LoRA:
    modules: dict[str, "Module | lycoris.Adapter"]  # kohya name -> module
    metadata: dict[str, str]
    layout: Layout
    unplaced: list[str] = field(default_factory=list)  # file keys that name nothing in this model
    text_keys: list[str] = field(default_factory=list)  # text-encoder keys, when read for a UNet alone


def family_of(unet_cfg: UNetConfig) -> str:
    return "sdxl" if unet_cfg.adm_in_channels is not None else "sd"


def unet_layout(unet_cfg: UNetConfig) -> tuple[dict[str, Target], dict[str, str]]:
    to_diffusers = names.original_to_diffusers_paths(unet_cfg)
    sdxl = family_of(unet_cfg) == "sdxl"
    targets, aliases = {}, {}
    unet = names.meta_unet(unet_cfg)
    for path, diffusers_path in to_diffusers.items():
        name = names.kohya_name("lora_unet_", path if sdxl else diffusers_path)
        weight = unet.get_submodule(path).weight
        targets[name] = Target(f"model.diffusion_model.{path}.weight", tuple(weight.shape), unet_path=path)
        for spelling in (path, diffusers_path):
            aliases[names.kohya_name("lora_unet_", spelling)] = name
    return targets, aliases


def text_layout(cfg: ModelConfig) -> tuple[dict[str, Target], dict[str, str], dict[str, str]]:
    """CLIP-L in transformers' names; OpenCLIP named as transformers names it (kohya's te2), placed on open_clip keys."""
    if cfg.family == "sdxl":
        towers = [("lora_te1_", "conditioner.embedders.0.", cfg.text_encoders[0]), ("lora_te2_", "conditioner.embedders.1.", cfg.text_encoders[1])]
    else:
        towers = [("lora_te_", "cond_stage_model.", cfg.text_encoders[0])]
    targets, aliases = {}, {}
    for prefix, key_prefix, te in towers:
        w, mlp = te.width, te.mlp_dim
        for layer in range(te.layers):
            for linear in TEXT_LINEARS:
                name = f"{prefix}text_model_encoder_layers_{layer}_{linear.replace('.', '_')}"
                shape = (mlp, w) if linear == "mlp.fc1" else (w, mlp) if linear == "mlp.fc2" else (w, w)
                if isinstance(te, CLIPTextConfig):
                    target = Target(f"{key_prefix}transformer.text_model.encoder.layers.{layer}.{linear}.weight", shape)
                elif linear in OPENCLIP_LINEARS:
                    target = Target(f"{key_prefix}model.transformer.resblocks.{layer}.{OPENCLIP_LINEARS[linear]}.weight", shape)
                else:
                    i = "qkv".index(linear[len("self_attn.")])
                    target = Target(f"{key_prefix}model.transformer.resblocks.{layer}.attn.in_proj_weight", shape, (i * w, (i + 1) * w))
                targets[name] = target
                aliases[name] = name
                if prefix == "lora_te_":  # ComfyUI also reads SD 1.x's encoder as te1
                    aliases[name.replace("lora_te_", "lora_te1_", 1)] = name
    components = {"text_encoder": towers[0][0]} | ({"text_encoder_2": "lora_te2_"} if len(towers) == 2 else {})
    return targets, aliases, components


def layout(cfg: ModelConfig | UNetConfig) -> Layout:
    """The whole model's targets from a ModelConfig; a UNetConfig gives the UNet's only (text modules then unplaced)."""
    unet_cfg = cfg if isinstance(cfg, UNetConfig) else cfg.unet
    targets, aliases = unet_layout(unet_cfg)
    te_prefixes = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"} if family_of(unet_cfg) == "sdxl" else {"text_encoder": "lora_te_"}
    if isinstance(cfg, ModelConfig):
        te_targets, te_aliases, te_prefixes = text_layout(cfg)
        targets.update(te_targets)
        aliases.update(te_aliases)
    return Layout(family_of(unet_cfg), targets, aliases, te_prefixes)


def split_key(key: str) -> tuple[str, str] | None:
    """(module, part) of a file key (LyCORIS parts by their own suffix), or None for a tensor no reader here understands."""
    for suffix, part in PARTS:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def kohya_spelling(module: str, lay: Layout) -> tuple[str, str, str]:
    """A file's module string -> (underscore name, diffusers component, module path inside it) in kohya's spelling."""
    if module.startswith("lora_"):
        return module, "", ""
    module = module.removeprefix("base_model.model.")
    component, _, rest = module.partition(".")
    if module.startswith(("text_encoders.clip_l.transformer.", "clip_l.transformer.")):
        component, rest = "text_encoder", module.split("transformer.", 1)[1]
    elif module.startswith(("text_encoders.clip_g.transformer.", "clip_g.transformer.")):
        component, rest = "text_encoder_2", module.split("transformer.", 1)[1]
    elif component not in ("unet", "diffusion_model", "text_encoder", "text_encoder_2"):
        component, rest = "unet", module  # PEFT's own state dict of the UNet has no prefix
    if component in lay.te_prefixes:
        rest = rest if rest.startswith("text_model.") else "text_model." + rest
        return lay.te_prefixes[component] + rest.replace(".", "_"), component, rest
    rest = rest.replace(".processor.", ".")
    rest = rest + ".0" if rest.endswith(".to_out") else rest
    return "lora_unet_" + rest.replace(".", "_"), "unet", rest


def peft_alpha(meta: dict, component: str, path: str, rank: int) -> float | None:
    """The alpha diffusers' `lora_adapter_metadata` gives a module (alpha_pattern, lora_alpha, rsLoRA), as kohya's alpha."""
    if not meta or f"{component}.lora_alpha" not in meta:
        return None
    alpha = float(meta[f"{component}.lora_alpha"])
    for pattern, value in (meta.get(f"{component}.alpha_pattern") or {}).items():
        if path == pattern or path.endswith("." + pattern):
            alpha = float(value)
    return alpha * math.sqrt(rank) if meta.get(f"{component}.use_rslora") else alpha


def read(path, cfg: ModelConfig | UNetConfig) -> LoRA:
    """Any supported LoRA file as kohya-named modules of the model `cfg` describes; shapes checked against it."""
    tensors, metadata = read_lora(path)
    lay = layout(cfg)
    peft_meta = json.loads(metadata["lora_adapter_metadata"]) if "lora_adapter_metadata" in metadata else {}
    parts: dict[str, dict] = {}
    unplaced, text_keys, unet_only = [], [], isinstance(cfg, UNetConfig)
    for key, t in tensors.items():
        split = split_key(key)
        name, component, module_path = kohya_spelling(split[0], lay) if split else ("", "", "")
        canonical = lay.aliases.get(name)
        if canonical is None:
            if unet_only and name.startswith("lora_te"):
                require_finite(path, split[0], split[1], t)  # not applied here, but the file is as broken
                text_keys.append(key)
            else:
                unplaced.append(key)
            continue
        got = parts.setdefault(canonical, {"source": split[0], "component": component, "path": module_path})
        if got["source"] != split[0]:
            raise LoRAFileError(f"{path}: {got['source']} and {split[0]} both name module {canonical}")
        got[split[1]] = t
    modules = {}
    for name, got in sorted(parts.items()):
        if any(part in got for part in (*lycoris.KEYS, *lycoris.TUCKER)):
            modules[name] = lycoris_module(path, got, lay.targets[name].shape)
            continue
        if "down" not in got or "up" not in got:
            raise LoRAFileError(f"{path}: module {got['source']} lacks its {'up' if 'down' in got else 'down'} weight")
        down, up = got["down"], got["up"]
        alpha = float(got["alpha"]) if "alpha" in got else peft_alpha(peft_meta, got["component"], got["path"], down.shape[0])
        m = checked(path, got["source"], Module(down, up, float(down.shape[0]) if alpha is None else alpha),
                    lay.targets[name].shape)
        for part, t in (("down", m.down), ("up", m.up), ("alpha", torch.tensor(m.alpha))):  # alpha: the file's, or PEFT's
            require_finite(path, got["source"], part, t)
        modules[name] = m
    return LoRA(modules, metadata, lay, sorted(unplaced), sorted(text_keys))


def lycoris_module(path, got: dict, shape: tuple[int, ...]) -> lycoris.Adapter:
    """A LyCORIS module's parts as an Adapter, checked against the weight's shape and for NaN/Inf; no alpha: scale 1."""
    tensors = {key: got[part] for key, part in (("lora_down.weight", "down"), ("lora_up.weight", "up")) if part in got}
    tensors |= {key: got[key] for key in (*lycoris.KEYS, *lycoris.TUCKER) if key in got}
    lycoris.check(path, got["source"], tensors, shape)
    for key, t in tensors.items():
        require_finite(path, got["source"], key, t)
    alpha = float(got["alpha"]) if "alpha" in got else float(lycoris.rank_of(tensors) or 1)  # no alpha: scale 1
    return lycoris.Adapter(tensors, alpha)


def require_finite(path, source: str, part: str, t: torch.Tensor) -> None:
    """A LoRAFileError naming the module when `t` holds NaN or Inf. Checked here, where every tool reads a file:
    merged, such a module turns its checkpoint weight to NaN, sampled it renders noise or black, resized it breaks the SVD."""
    bad = t.numel() - int(torch.isfinite(t).sum())
    if bad:
        what = "alpha" if part == "alpha" else f"{part} weight"
        raise LoRAFileError(f"{path}: module {source} holds NaN/Inf values ({what}: {bad} of {t.numel()}); "
                            "the file is broken: retrain, or take an earlier epoch's file")


def checked(path, source: str, m: Module, shape: tuple[int, ...]) -> Module:
    """The module with kohya's tensor shapes for a weight of `shape`, or a LoRAFileError naming it."""
    r, fan_in = m.down.shape[0], math.prod(shape[1:])
    if m.up.shape[0] != shape[0] or m.up.numel() != shape[0] * r or m.down.numel() != r * fan_in:
        raise LoRAFileError(f"{path}: {source} has down {tuple(m.down.shape)} and up {tuple(m.up.shape)}, "
                            f"the model's weight is {shape}")
    conv = len(shape) == 4
    down = m.down.reshape(r, *shape[1:]) if conv else m.down.reshape(r, fan_in)
    up = m.up.reshape(shape[0], r, 1, 1) if conv else m.up.reshape(shape[0], r)
    return Module(down, up, m.alpha)


def add_deltas(w: torch.Tensor, entries: list[tuple[Target, "Module | lycoris.Adapter", float]]) -> torch.Tensor:
    """Add each module's delta at its weight into `w` (the fp32 weight of one checkpoint key, changed in place; the
    rows of a fused q/k/v one); DoRA's delta rescales the weight it meets. Returns `w`."""
    for target, m, weight in entries:
        rows = slice(*target.rows) if target.rows else slice(None)
        w[rows] += weight * m.delta(target.shape, w[rows]).reshape(w[rows].shape)
    return w


def require_placed(path, lo: LoRA) -> LoRA:
    if lo.unplaced:
        raise LoRAFileError(f"{path}: {len(lo.unplaced)} keys name nothing in this model, first: {lo.unplaced[0]}")
    if not lo.modules:
        raise LoRAFileError(f"{path}: no LoRA modules")
    return lo


def to_kohya(lo: LoRA, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in sorted(lo.modules.items()):
        if isinstance(m, lycoris.Adapter):
            t = m.tensors if dtype is None else m.to(dtype).tensors
            out |= {f"{name}.{key}": v.contiguous() for key, v in t.items()}
            out[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=dtype or next(iter(t.values())).dtype)
            continue
        dt = dtype or m.down.dtype
        out[f"{name}.lora_down.weight"] = m.down.to(dt).contiguous()
        out[f"{name}.lora_up.weight"] = m.up.to(dt).contiguous()
        out[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=dt)
    return out


def kohya_metadata(lo: LoRA, family: str, title: str) -> dict[str, str]:
    """The file's own kohya/modelspec metadata, completed where a converted file lacks it."""
    family = "sd15" if family == "sd" else family
    ranks = {m.rank for m in lo.modules.values()}
    alphas = {m.alpha for m in lo.modules.values()}
    meta = {k: v for k, v in lo.metadata.items() if k.startswith(("ss_", "modelspec."))}
    algos = sorted({m.algo for m in lo.modules.values() if isinstance(m, lycoris.Adapter)})
    defaults = {
        "ss_network_module": "lycoris.kohya" if algos else "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic",
        "ss_base_model_version": BASE_MODEL_VERSION.get(family, ""),
        **({"ss_network_args": json.dumps(lycoris.network_args(algos[0]))} if len(algos) == 1 else {}),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE.get(family, ""),
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
    }
    return defaults | meta


def to_diffusers(lo: LoRA, cfg: ModelConfig | UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers' layout (`unet.<diffusers path>.lora_A.weight`, `text_encoder(_2).text_model...`); alpha / rank is
    folded into lora_B, so the file needs no alphas and loads at the right strength in diffusers and PEFT."""
    unet_cfg = cfg if isinstance(cfg, UNetConfig) else cfg.unet
    to_diffusers_path = names.original_to_diffusers_paths(unet_cfg)
    lay = layout(cfg)
    component_of = {prefix: component for component, prefix in lay.te_prefixes.items()}
    out = {}
    for name, m in sorted(lo.modules.items()):
        if isinstance(m, lycoris.Adapter):
            raise LoRAFileError(f"{name}: a {m.algo} module has no diffusers/PEFT layout here; keep the kohya/LyCORIS layout")
        target = lay.targets[name]
        if target.unet_path is not None:
            module = "unet." + to_diffusers_path[target.unet_path]
        else:
            prefix = next(p for p in component_of if name.startswith(p))
            layer, linear = name[len(prefix + "text_model_encoder_layers_"):].split("_", 1)
            dotted = next(t for t in TEXT_LINEARS if t.replace(".", "_") == linear)
            module = f"{component_of[prefix]}.text_model.encoder.layers.{layer}.{dotted}"
        out[f"{module}.lora_A.weight"] = m.down.contiguous()
        out[f"{module}.lora_B.weight"] = (m.up.float() * (m.alpha / m.rank)).to(m.up.dtype).contiguous()
    return out


def unet_modules(lo: LoRA) -> dict[str, tuple[str, Module]]:
    """kohya name -> (engine UNet module path, module) for the file's UNet modules."""
    targets = lo.layout.targets
    return {n: (targets[n].unet_path, m) for n, m in lo.modules.items() if targets[n].unet_path is not None}
