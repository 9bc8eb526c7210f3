"""Render images with the engine's models: prompts, LoRA tags, samplers, VAE decode, PNG parameters, X/Y grids.

Each PNG carries its generation parameters in a `parameters` text chunk in AUTOMATIC1111's infotext format
(prompt, `Negative prompt: ...`, then `Key: value, ...`), which AUTOMATIC1111, ComfyUI and civitai read back.
Noise comes from one CPU generator per image seeded with seed + index, so an image does not depend on the batch
size or the device ("RNG: CPU").
"""
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from gesso import models
from gesso.engine import diffusion
from gesso.engine.embedding import vectors as embedding
from gesso.engine.io import write_atomic
from gesso.engine.lora import network as lora
from gesso.engine.lora.files import read_lora_header
from gesso.engine.lora.network import load_network
from gesso.engine.sampling import prompt as prompts
from gesso.engine.sampling import samplers as sampling
from gesso.engine.sampling import text_lora as te_lora
from gesso.errors import RenderError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Settings:
    """One image's generation parameters: everything its infotext records."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 28
    sampler: str = "dpmpp_2m_karras"
    cfg_scale: float = 6.0
    seed: int = 0
    width: int = 1024
    height: int = 1024
    denoising_strength: float | None = None  # img2img only
    emphasis: str = "a1111"


@dataclass
class Pipeline:
    sd: models.StableDiffusion
    tokenizers: list
    model_name: str
    lora_dir: Path | None = None
    vae_dtype: torch.dtype = torch.float32
    attached: tuple[Path, lora.LoRANetwork] | None = None
    text_lora: te_lora.TextLoRA | None = None  # the attached file's text-encoder modules, patched into the encoders
    text_cache: dict = field(default_factory=dict)
    progress: bool = False  # a bar over each image's sampling steps (`sample`, `grid`); training's previews have their own

    @property
    def device(self) -> torch.device:
        return next(self.sd.unet.parameters()).device


def load_pipeline(model: models.Model, model_seed: int = 0, device: str = "cpu", dtype: str = "fp32",
                  vae_dtype: str = "fp32", lora_dir: str | Path | None = None, prediction: str = "auto",
                  zero_terminal_snr: bool | None = None, embeddings_dir: str | Path | None = None) -> Pipeline:
    """`model` as models.find_model found it: a built-in (random init from `model_seed`, as the demo trains on) or a
    checkpoint; ready to sample. `prediction` ("auto": what the checkpoint says, else "epsilon" or "v_prediction") and
    `zero_terminal_snr` (None: the checkpoint's) override. `embeddings_dir`: textual-inversion files that prompts name
    as `embedding:name` or `name`."""
    if model.config.family == "sdxl" and vae_dtype == "fp16":
        raise RenderError("vae dtype fp16: SDXL's VAE overflows in fp16; use bf16 or fp32")
    sd = model.load(DTYPES[dtype], device, seed=model_seed, vae_dtype=DTYPES[vae_dtype])
    name = model.name
    sd.cfg = replace(sd.cfg, prediction=sd.cfg.prediction if prediction == "auto" else prediction,
                     zero_terminal_snr=sd.cfg.zero_terminal_snr if zero_terminal_snr is None else zero_terminal_snr)
    if sd.cfg.prediction not in sampling.DENOISERS:
        raise RenderError(f"prediction {sd.cfg.prediction!r}: choose one of auto, {', '.join(sampling.DENOISERS)}")
    if sd.cfg.zero_terminal_snr and sd.cfg.prediction == "epsilon":
        raise RenderError(f"{name}: zero terminal SNR needs a v-prediction model (an ε-model cannot denoise pure noise)")
    sd.requires_grad_(False).eval()
    tokenizers = model.tokenizers()
    if embeddings_dir:
        try:
            embedding.attach_folder(sd, tokenizers, embeddings_dir)
        except embedding.EmbeddingFileError as e:
            raise RenderError(str(e)) from None
    return Pipeline(sd, tokenizers, name, Path(lora_dir) if lora_dir else None, DTYPES[vae_dtype])


def attach_lora(unet: torch.nn.Module, path: Path) -> tuple[lora.LoRANetwork, list[str]]:
    """Load a LoRA file's UNet modules (any layout load_network reads, LoCon included) at multiplier 1.

    Returns the network and the file's text-encoder module names, which `set_lora` applies (engine/sampling/text_lora.py).
    """
    network = load_network(unet, path)
    for p in network.parameters():
        p.requires_grad_(False)
    keys = read_lora_header(path)[0]
    text_modules = sorted({k.split(".")[0] for k in keys if k.startswith(("lora_te", "text_encoder", "te_", "te1", "te2"))})
    return network, text_modules


def set_lora(pipe: Pipeline, tags: list[prompts.LoraTag]) -> None:
    """Make the UNet and the text encoders carry exactly the tagged LoRA at its strengths (`<lora:name:w>` both,
    `<lora:name:te:unet>` each; none when no tag); reloads only on a new file."""
    if len(tags) > 1:
        raise RenderError(f"{len(tags)} <lora:...> tags: stacking LoRAs is not supported yet, use one")
    path = None
    if tags:
        if pipe.lora_dir is None:
            raise RenderError(f"<lora:{tags[0].name}:...>: no LoRA folder given; pass --lora-dir, the folder with "
                              f"{tags[0].name}.safetensors")
        path = pipe.lora_dir / f"{tags[0].name}.safetensors"
    if pipe.attached and pipe.attached[0] != path:
        pipe.attached[1].remove()
        pipe.attached = None
        if pipe.text_lora is not None:
            set_text_strength(pipe, 0.0)  # the encoders' own weights back
            pipe.text_lora = None
    if path and not pipe.attached:
        network, text_modules = attach_lora(pipe.sd.unet, path)
        pipe.attached = (path, network)
        pipe.text_lora = te_lora.read_text_lora(pipe.sd, path) if text_modules else None
    if pipe.attached:
        pipe.attached[1].set_multiplier(tags[0].unet)
        if pipe.text_lora is not None:
            set_text_strength(pipe, tags[0].te)


def set_text_strength(pipe: Pipeline, strength: float) -> None:
    if te_lora.set_strength(pipe.sd, pipe.text_lora, strength):
        pipe.text_cache = {}  # encoded with the encoders as they were


def encode_pair(pipe: Pipeline, text: str, negative: str, emphasis: str):
    """(context, y) for the prompt and the negative prompt, (2, ...) in that order, cached per text."""
    text, negative = embedding.expand(pipe.sd, text), embedding.expand(pipe.sd, negative)  # embedding:name, name
    key = (text, negative, emphasis)
    if key not in pipe.text_cache:
        pipe.text_cache = {key: prompts.encode(pipe.sd, pipe.tokenizers, [text, negative], emphasis)}
    return pipe.text_cache[key]


def size_multiple(pipe: Pipeline) -> int:
    """Image sides the UNet takes: the VAE's 8 times one halving per level below the first."""
    return 8 * 2 ** (len(pipe.sd.cfg.unet.channel_mult) - 1)


def check_size(pipe: Pipeline, s: Settings) -> None:
    multiple = size_multiple(pipe)
    if s.width % multiple or s.height % multiple:
        raise RenderError(f"size {s.width}x{s.height}: width and height must be multiples of {multiple} for {pipe.model_name}")


@torch.no_grad()
def generate(pipe: Pipeline, s: Settings, batch_size: int = 1, init_latents: torch.Tensor | None = None) -> torch.Tensor:
    """Latents (B, 4, H/8, W/8) for seeds s.seed .. s.seed + B - 1; img2img from init_latents when given."""
    check_size(pipe, s)
    sd, device = pipe.sd, pipe.device
    text, tags = prompts.extract_lora_tags(s.prompt)
    set_lora(pipe, tags)
    context, pooled = encode_pair(pipe, text, s.negative_prompt, s.emphasis)
    y = None
    if sd.cfg.unet.adm_in_channels is not None:  # SDXL size conditioning, as AUTOMATIC1111 sets it: no crop
        size = [(s.height, s.width)] * 2
        y = sd.adm(pooled, size, [(0, 0)] * 2, size)
    context, y = context.repeat_interleave(batch_size, 0), None if y is None else y.repeat_interleave(batch_size, 0)

    def predict(x_in: torch.Tensor, t: float) -> torch.Tensor:  # the UNet's ε or v, guided
        if s.cfg_scale == 1:
            return sd.unet(x_in, torch.full((batch_size,), t, device=device), context[:batch_size],
                           None if y is None else y[:batch_size]).float()
        both = torch.cat([x_in, x_in])  # the UNet casts to its compute dtype
        out = sd.unet(both, torch.full((2 * batch_size,), t, device=device), context, y).float()
        return sampling.guided(out[:batch_size], out[batch_size:], s.cfg_scale)

    sampler = sampling.get_sampler(s.sampler)
    alphas_cumprod = diffusion.scaled_linear_alphas_cumprod(zero_terminal_snr=sd.cfg.zero_terminal_snr)
    schedule = sampler.schedule(sampling.training_sigmas(alphas_cumprod), s.steps)
    generators = [torch.Generator().manual_seed(s.seed + i) for i in range(batch_size)]
    shape = (sd.cfg.unet.in_channels, s.height // 8, s.width // 8)
    noise = sampling.image_noise(generators, shape, device)
    if init_latents is None:
        x = sampling.initial_latent(noise, schedule)
    else:
        steps = min(int(s.steps * s.denoising_strength), s.steps)  # diffusers' img2img: int(n * strength) steps
        if steps == 0:
            return init_latents.float()
        schedule = schedule.tail(steps)
        x = sampling.noised_latent(init_latents.float().to(device), noise, schedule)
    with tqdm(total=len(schedule.timesteps), desc="sampling", unit="step", leave=False, disable=not pipe.progress) as bar:
        def counted(x_in: torch.Tensor, t: float) -> torch.Tensor:
            bar.update()
            return predict(x_in, t)

        x = sampler.run(sampling.denoiser(sd.cfg.prediction, counted), x, schedule,
                        lambda: sampling.image_noise(generators, shape, device))
    return sampling.final_latent(x, schedule)


@torch.no_grad()
def decode(pipe: Pipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> RGB images, the VAE in its own dtype (never fp16 for SDXL), one image at a time to bound memory."""
    images = []
    for latent in latents:
        pixels = pipe.sd.decode_latents(latent[None].to(pipe.vae_dtype))[0].float()  # (3, H, W) in [-1, 1]
        array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        images.append(Image.fromarray(array))
    return images


@torch.no_grad()
def encode_image(pipe: Pipeline, image: Image.Image, s: Settings) -> torch.Tensor:
    """An init image resized to the settings' size -> scaled latents (1, 4, H/8, W/8)."""
    array = np.asarray(image.convert("RGB").resize((s.width, s.height), Image.LANCZOS), dtype=np.float32)
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1
    return pipe.sd.encode_images(pixels.to(pipe.device, pipe.vae_dtype)).float()


def render(pipe: Pipeline, s: Settings, batch_size: int = 1, init_image: Image.Image | None = None) -> list[tuple[Image.Image, str]]:
    """Images for seeds s.seed + i with their infotexts."""
    init = None if init_image is None else encode_image(pipe, init_image, s).repeat(batch_size, 1, 1, 1)
    images = decode(pipe, generate(pipe, s, batch_size, init))
    return [(img, infotext(pipe, replace(s, seed=s.seed + i))) for i, img in enumerate(images)]


def lora_hash(path: Path) -> str:
    """First 12 hex digits of the sha256 of the bytes after the safetensors header (AUTOMATIC1111's LoRA short hash)."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]


def lora_names(prompt: str) -> list[str]:
    return [tag.name for tag in prompts.extract_lora_tags(prompt)[1]]


def quote(value) -> str:
    """A value as AUTOMATIC1111 writes it: JSON-quoted when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def infotext(pipe: Pipeline, s: Settings, extra: dict | None = None) -> str:
    """AUTOMATIC1111's parameters text: prompt, `Negative prompt:` line, then `Key: value, ...` on the last line."""
    sampler = sampling.get_sampler(s.sampler)
    fields = {
        "Steps": s.steps,
        "Sampler": sampler.a1111_name,
        "Schedule type": sampler.a1111_schedule,
        "CFG scale": f"{s.cfg_scale:g}",
        "Seed": s.seed,
        "Size": f"{s.width}x{s.height}",
        "Model": pipe.model_name,
        "Denoising strength": None if s.denoising_strength is None else f"{s.denoising_strength:g}",
        "Emphasis": {"a1111": None, "comfy": "ComfyUI"}[s.emphasis],
        "RNG": "CPU",
        "Lora hashes": ", ".join(f"{n}: {lora_hash(pipe.lora_dir / f'{n}.safetensors')}" for n in lora_names(s.prompt)) or None,
        **(extra or {}),
        "Version": "gesso",
    }
    lines = [s.prompt] + ([f"Negative prompt: {s.negative_prompt}"] if s.negative_prompt else [])
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, parameters: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", parameters)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    return path


def next_index(folder: Path) -> int:
    """The next free NNNNN prefix in `folder`, as AUTOMATIC1111 numbers its outputs."""
    numbers = [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def grid_image(cells: list[list[Image.Image]], x_labels: list[str], y_labels: list[str]) -> Image.Image:
    """Rows of equal-size images under a header of x labels, beside a column of y labels."""
    w, h = cells[0][0].size
    font = ImageFont.load_default(size=max(12, min(w, h) // 10))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(measure.textlength(t, font=font)) for t in y_labels) + 16
    label_h = int(font.size * 1.6)
    out = Image.new("RGB", (label_w + w * len(x_labels), label_h + h * len(y_labels)), "white")
    draw = ImageDraw.Draw(out)
    for j, text in enumerate(x_labels):
        draw.text((label_w + j * w + w / 2, label_h / 2), text, fill="black", font=font, anchor="mm")
    for i, text in enumerate(y_labels):
        draw.text((label_w / 2, label_h + i * h + h / 2), text, fill="black", font=font, anchor="mm")
        for j, img in enumerate(cells[i]):
            out.paste(img, (label_w + j * w, label_h + i * h))
    return out


AXES = {"epoch": None, "strength": None, "seed": "seed", "cfg": "cfg_scale", "steps": "steps", "sampler": "sampler"}


@dataclass(frozen=True)
class Axis:
    kind: str  # one of AXES
    values: tuple  # epoch: LoRA file stems; strength, cfg: floats; seed, steps: ints; sampler: names

    def label(self, value) -> str:
        if self.kind == "epoch":
            return f"epoch {int(value.rsplit('-', 1)[1])}"
        return f"{self.kind} {value:g}" if isinstance(value, float) else f"{self.kind} {value}"


def epoch_files(run_dir: Path, name: str | None = None) -> list[Path]:
    """`<name>-NNNNNN.safetensors` in a training output folder, by epoch; `name` may be left out when there is one."""
    files = sorted(p for p in Path(run_dir).glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].safetensors")
                   if name is None or p.name.rsplit("-", 1)[0] == name)
    names = {p.name.rsplit("-", 1)[0] for p in files}
    if not files:
        raise RenderError(f"{run_dir}: no <name>-NNNNNN.safetensors epoch files" + (f" for {name}" if name else ""))
    if len(names) > 1:
        raise RenderError(f"{run_dir}: epoch files of several runs ({', '.join(sorted(names))}); pass --name")
    return files


def cell(base: Settings, assignment: dict, lora_name: str | None, strength: float) -> Settings:
    """The settings of one grid cell: the axes' values set, the LoRA as a `<lora:name:w>` tag on the prompt."""
    s = replace(base, **{AXES[k]: v for k, v in assignment.items() if AXES[k]})
    name, weight = assignment.get("epoch", lora_name), assignment.get("strength", strength)
    return replace(s, prompt=f"{s.prompt} <lora:{name}:{weight:g}>") if name else s


def render_grid(pipe: Pipeline, base: Settings, x: Axis, y: Axis, out_dir: Path, lora_name: str | None = None,
                strength: float = 1.0, on_cell: Callable[[int, int, Settings, Path, str], None] | None = None) -> tuple[Path, list[Path]]:
    """Every (y, x) cell rendered and saved as a single PNG, then the labelled grid PNG; returns their paths.
    on_cell(row, column, settings, path, infotext) after each cell's file is written (a host shows it at once)."""
    if x.kind == y.kind:
        raise RenderError(f"x and y are both {x.kind}: choose two different axes")
    settings = [[cell(base, {x.kind: xv, y.kind: yv}, lora_name, strength) for xv in x.values] for yv in y.values]
    cells = [(i, j) for i in range(len(y.values)) for j in range(len(x.values))]
    order = sorted(cells, key=lambda ij: lora_names(settings[ij[0]][ij[1]].prompt))  # one LoRA load per file
    images: list[list] = [[None] * len(x.values) for _ in y.values]
    paths = []
    index = next_index(out_dir)
    for i, j in tqdm(order, desc="grid", unit="image", disable=not pipe.progress):
        s = settings[i][j]
        (image, text), = render(pipe, s)
        images[i][j] = image
        paths.append(save_png(image, out_dir / f"{index:05d}-{s.seed}.png", text))
        index += 1
        if on_cell is not None:
            on_cell(i, j, s, paths[-1], text)
    grid = grid_image(images, [x.label(v) for v in x.values], [y.label(v) for v in y.values])
    plot = f"x: {x.kind} {', '.join(map(str, x.values))}; y: {y.kind} {', '.join(map(str, y.values))}"
    grid_path = out_dir / f"xy_grid-{index:05d}.png"
    text = infotext(pipe, settings[0][0], {"X/Y plot": plot})
    return save_png(grid, grid_path, text), paths
