"""sample() called as a host program calls it: image sizes, infotexts, seeds, LoRA tags, img2img, and typed errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from gesso import models
from gesso.engine.lora import names
from gesso.engine.lora.files import save_lora
from gesso.engine.sampling.sample import sample
from gesso.errors import CheckpointError, PromptError, RenderError

PROMPT = "gssdemo, a red circle"
FAST = dict(steps=2, sampler="euler", width=64, height=96)  # non-square, multiples of 32 for the tiny UNet


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """demo.safetensors: random attention modules for tiny-sdxl, tagged with the model it was trained on."""
    folder = tmp_path_factory.mktemp("loras")
    unet = models.build("tiny-sdxl", seed=0, device="meta").unet
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for path in names.attention_targets(unet):
        module, name = unet.get_submodule(path), names.kohya_name("lora_unet_", path)
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, module.in_features, generator=g) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_lora(folder / "demo.safetensors", tensors, {"ss_sd_model_name": "tiny-sdxl", "ss_base_model_version": "sdxl_base_v1-0"})
    return folder


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_batch_has_the_size_and_each_image_its_infotext():
    images = sample(PROMPT, "tiny-sdxl", negative_prompt="blurry", seed=5, batch_size=2, cfg_scale=4.5, **FAST)
    assert [im.size for im in images] == [(64, 96), (64, 96)]
    for seed, im in zip((5, 6), images):
        text = im.info["parameters"]
        assert text.startswith(PROMPT + "\nNegative prompt: blurry\n")
        assert f"Seed: {seed}," in text and "Size: 64x96" in text and "Steps: 2" in text and "CFG scale: 4.5" in text
    assert np.abs(pixels(images[0]) - pixels(images[1])).max() > 8  # two seeds, two pictures


@pytest.mark.slow
def test_same_seed_same_pixels_other_seed_other_pixels():
    first = sample(PROMPT, "tiny-sdxl", seed=7, **FAST)[0]
    again = sample(PROMPT, "tiny-sdxl", seed=7, **FAST)[0]
    other = sample(PROMPT, "tiny-sdxl", seed=8, **FAST)[0]
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).max() > 8


def test_native_size_when_none_given():
    (image,) = sample(PROMPT, "tiny-sdxl", steps=1, sampler="euler")
    assert image.size == (128, 128) and "Size: 128x128" in image.info["parameters"]


def test_model_from_the_tagged_lora_file_and_the_lora_changes_the_image(lora_dir):
    tagged = sample(PROMPT + " <lora:demo:0.8>", lora_dir=lora_dir, seed=3, **FAST)[0]
    text = tagged.info["parameters"]
    assert "Model: tiny-sdxl," in text and 'Lora hashes: "demo: ' in text and "<lora:demo:0.8>" in text
    plain = sample(PROMPT, "tiny-sdxl", seed=3, **FAST)[0]
    assert np.abs(pixels(tagged) - pixels(plain)).max() > 8


@pytest.mark.slow
def test_init_image_as_path_or_image_gives_the_same_picture(tmp_path):
    source = sample("a blue square", "tiny-sdxl", seed=1, **FAST)[0]
    source.save(tmp_path / "init.png")
    settings = dict(FAST, steps=6)
    from_image = sample(PROMPT, "tiny-sdxl", seed=2, init_image=source, denoise=0.5, **settings)[0]
    from_path = sample(PROMPT, "tiny-sdxl", seed=2, init_image=tmp_path / "init.png", denoise=0.5, **settings)[0]
    assert np.array_equal(pixels(from_image), pixels(from_path))
    assert "Denoising strength: 0.5" in from_path.info["parameters"]
    fresh = sample(PROMPT, "tiny-sdxl", seed=2, **settings)[0]
    # half the steps from the source stay closer to it than a render from noise
    assert np.abs(pixels(from_path) - pixels(source)).mean() < np.abs(pixels(fresh) - pixels(source)).mean()


@pytest.mark.parametrize("kwargs, error, named", [
    (dict(model="tiny-sdxl", init_image="{tmp}/missing.png"), RenderError, "missing.png: no such image file"),
    (dict(model="tiny-sdxl", init_image="{tmp}/not_an_image.png"), RenderError, "not_an_image.png: not a readable image"),
    (dict(prompt=PROMPT + " <lora:absent:1>", lora_dir="{tmp}"), RenderError, "absent.safetensors: no such LoRA file"),
    (dict(prompt=PROMPT + " <lora:demo:1>"), RenderError, "<lora:demo:...>: no LoRA folder given; pass lora_dir"),
    (dict(model="{tmp}/nockpt.safetensors"), CheckpointError, "model: no such file: {tmp}/nockpt.safetensors"),
    (dict(model="sdxl-turbo"), CheckpointError, "model: unknown model config 'sdxl-turbo'; built-in: demo-sdxl, sd15"),
    (dict(model=None), RenderError, "pass model"),  # no LoRA file to take it from
    (dict(model="tiny-sdxl", width=65), RenderError, "size 65x96: width and height must be multiples of 32"),
    (dict(model="tiny-sdxl", sampler="heun_pp"), RenderError, "sampler 'heun_pp'"),
    (dict(model="tiny-sdxl", init_image="{tmp}/init.png", denoise=1.5), RenderError, "denoise 1.5"),
    (dict(model="tiny-sdxl", prompt=PROMPT + " <lora:demo:strong>", lora_dir="{tmp}"), PromptError, "<lora:demo:strong>"),
])
def test_bad_input_raises_one_line_naming_it(tmp_path, kwargs, error, named):
    Image.new("RGB", (64, 96), "red").save(tmp_path / "init.png")
    (tmp_path / "not_an_image.png").write_bytes(b"not a png")
    kwargs = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(error) as info:
        sample(**{"prompt": PROMPT, **FAST, **kwargs})
    assert named.format(tmp=tmp_path) in str(info.value) and "\n" not in str(info.value)
