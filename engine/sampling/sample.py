"""Render a prompt to images in one call, the model, size and seeds resolved as `gesso sample` resolves them.

sample() is what a host program calls; `gesso sample` and `gesso grid` call the same steps (open_pipeline,
settings_for, render_batch) so that one loaded model serves every batch. Each image carries its AUTOMATIC1111
infotext in image.info["parameters"], the text render.save_png writes into the PNG.
"""
import random
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from gesso import models
from gesso.engine.lora.files import read_lora_header
from gesso.engine.sampling import render
from gesso.engine.sampling import samplers as sampling
from gesso.engine.sampling.options import fit_side, split_options
from gesso.engine.sampling.prompt import extract_lora_tags
from gesso.errors import RenderError

NATIVE_SIZE = {"sdxl": 1024, "sd15": 512, "sd2": 768, "tiny-sdxl": 128, "tiny-sd15": 128, "demo-sdxl": 128}


def tagged_lora_files(prompt: str, lora_dir: str | Path | None) -> list[Path]:
    """The files the prompt's <lora:name:w> tags name, as name.safetensors in `lora_dir`; each must exist."""
    tags = extract_lora_tags(prompt)[1]
    if tags and lora_dir is None:
        raise RenderError(f"<lora:{tags[0].name}:...>: no LoRA folder given; pass lora_dir (--lora-dir), the folder "
                          f"with {tags[0].name}.safetensors")
    files = [Path(lora_dir) / f"{t.name}.safetensors" for t in tags]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise RenderError(f"{missing[0]}: no such LoRA file")
    return files


def model_for(model: str | Path | None, lora_files: list[Path]) -> models.Model:
    """`model` when given, else the first LoRA file's ss_sd_model_name that is a built-in model or an existing checkpoint."""
    if model:
        return models.find_model(model, "model")
    for path in lora_files:
        found = models.recorded_model(read_lora_header(path)[1].get("ss_sd_model_name", ""))
        if found is not None:
            return found
    raise RenderError("pass model (--model): no LoRA file's ss_sd_model_name is a built-in model or an existing checkpoint")


def prediction_for(model: models.Model, lora_files: list[Path], prediction: str = "auto") -> tuple[str, bool | None]:
    """(prediction, zero terminal SNR) to sample with: `prediction` when given; for a built-in (random-init) model, what
    the first LoRA file's modelspec.prediction_type and ss_zero_terminal_snr say it was trained as; else the checkpoint's."""
    if prediction != "auto" or model.checkpoint is not None:
        return prediction, None
    for path in lora_files:
        meta = read_lora_header(path)[1]
        if meta.get("modelspec.prediction_type") in ("epsilon", "v"):
            kind = "v_prediction" if meta["modelspec.prediction_type"] == "v" else "epsilon"
            return kind, meta.get("ss_zero_terminal_snr") == "True"
    return prediction, None


def open_pipeline(model: str | Path | None, lora_files: list[Path], lora_dir: str | Path | None = None, device: str = "auto",
                  dtype: str = "fp32", vae_dtype: str = "fp32", model_seed: int = 0, prediction: str = "auto",
                  embeddings_dir: str | Path | None = None, progress: bool = False) -> render.Pipeline:
    """The model ready to sample; `device` auto is cuda when there is one; `prediction` as prediction_for decides;
    `progress`: bars over the sampling steps."""
    for name, value in (("dtype", dtype), ("vae dtype", vae_dtype)):
        if value not in render.DTYPES:
            raise RenderError(f"{name} {value!r}: choose one of {', '.join(render.DTYPES)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model = model_for(model, lora_files)
    pipe = render.load_pipeline(model, model_seed, device, dtype, vae_dtype, lora_dir, *prediction_for(model, lora_files, prediction),
                                embeddings_dir=embeddings_dir)
    return replace(pipe, progress=progress)


def settings_for(pipe: render.Pipeline, prompt: str, negative_prompt: str = "", steps: int = 28,
                 sampler: str = "dpmpp_2m_karras", cfg_scale: float = 6.0, seed: int = 0, width: int | None = None,
                 height: int | None = None, emphasis: str = "a1111") -> render.Settings:
    """The settings of the first image; size defaults to the model's native size, a negative seed to a random one.
    kohya's options after the prompt text (`--w 832 --h 1216 --s 28 --l 6 --d 42 --n ...`) win over the arguments."""
    prompt, o = split_options(prompt)
    multiple = render.size_multiple(pipe)
    negative_prompt = negative_prompt if o.negative_prompt is None else o.negative_prompt
    steps, sampler, seed = o.steps or steps, o.sampler or sampler, seed if o.seed is None else o.seed
    cfg_scale = cfg_scale if o.cfg_scale is None else o.cfg_scale
    width = fit_side(o.width, multiple) if o.width is not None else width
    height = fit_side(o.height, multiple) if o.height is not None else height
    if sampler not in sampling.SAMPLERS:
        raise RenderError(f"sampler {sampler!r}: known: {', '.join(sampling.SAMPLERS)}")
    if steps < 1:
        raise RenderError(f"steps {steps}: must be at least 1")
    size = NATIVE_SIZE.get(pipe.sd.cfg.name) or NATIVE_SIZE[pipe.sd.cfg.family]  # a built-in's name is its config's
    width, height = width or size, height or size
    if width < 1 or height < 1:
        raise RenderError(f"size {width}x{height}: width and height must be positive")
    seed = seed if seed >= 0 else random.randrange(2**32)
    return render.Settings(prompt, negative_prompt, steps, sampler, cfg_scale, seed, width, height, emphasis=emphasis)


def open_image(image: str | Path | Image.Image) -> Image.Image:
    """An init image given as a PIL image or a file, as RGB."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except FileNotFoundError:
        raise RenderError(f"{image}: no such image file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise RenderError(f"{image}: not a readable image ({e})") from None


def img2img(s: render.Settings, denoise: float) -> render.Settings:
    """The settings for starting from an init image at `denoise` strength (the fraction of the steps run)."""
    if not 0 < denoise <= 1:
        raise RenderError(f"denoise {denoise}: must be in (0, 1]")
    return replace(s, denoising_strength=denoise)


def render_batch(pipe: render.Pipeline, s: render.Settings, batch_size: int = 1,
                 init_image: Image.Image | None = None) -> list[Image.Image]:
    """Images for seeds s.seed .. s.seed + batch_size - 1 in one sampling pass, each with info["parameters"]."""
    if batch_size < 1:
        raise RenderError(f"batch size {batch_size}: must be at least 1")
    images = []
    for image, text in render.render(pipe, s, batch_size, init_image):
        image.info["parameters"] = text
        images.append(image)
    return images


def sample(prompt: str, model: str | Path | None = None, *, negative_prompt: str = "", lora_dir: str | Path | None = None,
           steps: int = 28, sampler: str = "dpmpp_2m_karras", cfg_scale: float = 6.0, seed: int = 0,
           width: int | None = None, height: int | None = None, batch_size: int = 1,
           init_image: str | Path | Image.Image | None = None, denoise: float = 0.75, emphasis: str = "a1111",
           device: str = "auto", dtype: str = "fp32", vae_dtype: str = "fp32", model_seed: int = 0,
           prediction: str = "auto", embeddings_dir: str | Path | None = None, progress: bool = True) -> list[Image.Image]:
    """`batch_size` images of `prompt` (AUTOMATIC1111 syntax, <lora:name:w> tags read from `lora_dir`) for seeds
    seed, seed + 1, ...; img2img from `init_image` at `denoise` strength when given.

    `model`: a built-in name (random init from `model_seed`), a checkpoint file or diffusers folder, or None for the
    tagged LoRA files' ss_sd_model_name. A negative seed draws a random one; each image's infotext records it.
    kohya's options after the prompt (`--w 832 --h 1216 --s 28 --l 6 --d 42 --n ...`) win over the arguments.
    progress: a bar over the sampling steps on stderr (a host showing its own turns it off).
    `prediction`: "auto" (the checkpoint's marker keys, or for a built-in model the LoRA's metadata), "epsilon" or
    "v_prediction". `embeddings_dir`: textual-inversion files, named in the prompt as `embedding:name` or `name`.

        images = sample("gssdemo, a red circle", "tiny-sdxl", steps=4, width=64, height=64, seed=7)
        print(images[0].size, images[0].info["parameters"])  # (64, 64) and the infotext, `Seed: 7` included
    """
    init = None if init_image is None else open_image(init_image)
    pipe = open_pipeline(model, tagged_lora_files(prompt, lora_dir), lora_dir, device, dtype, vae_dtype, model_seed, prediction,
                         embeddings_dir, progress)
    s = settings_for(pipe, prompt, negative_prompt, steps, sampler, cfg_scale, seed, width, height, emphasis)
    return render_batch(pipe, s if init is None else img2img(s, denoise), batch_size, init)
