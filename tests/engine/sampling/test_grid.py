"""Rendering with the tiny SDXL model on CPU: LoRA files at a strength, the epochs-by-strength grid, PNG parameters.

The three epoch files are written with engine/lora/files.py save_lora in the training run's layout
(`demo-000001.safetensors` ...) with random, non-zero up weights so every file and strength changes the image.
"""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from gesso import cli, models
from gesso.engine.lora import names
from gesso.engine.lora.files import save_lora
from gesso.engine.sampling import render
from gesso.models.lookup import find_model

SIZE, STEPS = 64, 3
BASE = render.Settings("gssdemo, a red circle", "blurry", steps=STEPS, cfg_scale=5.0, seed=11, width=SIZE, height=SIZE)
STRENGTHS = (0.25, 0.5, 0.75, 1.0)
FIELD = re.compile(r'([A-Za-z][\w /-]*): ("(?:[^"\\]|\\.)*"|[^,]*)(?:, |$)')  # Key: value or Key: "quoted, value"


def lora_tensors(seed: int, rank: int = 4, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    unet = models.build("tiny-sdxl", seed=0, device="meta").unet
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in names.attention_targets(unet):
        module = unet.get_submodule(path)
        name = names.kohya_name("lora_unet_", path)
        out[f"{name}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
        out[f"{name}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    meta = {"ss_sd_model_name": "tiny-sdxl", "ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": "4"}
    for epoch in (1, 2, 3):
        save_lora(folder / f"demo-{epoch:06d}.safetensors", lora_tensors(epoch), {**meta, "ss_epoch": str(epoch)})
    save_lora(folder / "demo.safetensors", lora_tensors(3), meta)
    return folder


@pytest.fixture(scope="module")
def pipe(run_dir):
    return render.load_pipeline(find_model("tiny-sdxl"), 0, lora_dir=run_dir)


def parse_infotext(text: str) -> dict:
    *lines, last = text.split("\n")
    out = {"Prompt": "\n".join(l for l in lines if not l.startswith("Negative prompt: "))}
    out.update({"Negative prompt": l[len("Negative prompt: "):] for l in lines if l.startswith("Negative prompt: ")})
    out.update({k: v for k, v in FIELD.findall(last)})
    return out


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_lora_at_strength_equals_merged_weights(run_dir):
    # W + w * alpha/rank * up @ down, the merge every consumer of kohya files does
    sd = models.build("tiny-sdxl", seed=0).eval().requires_grad_(False)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400.0])
    context, y = torch.randn(1, 77, 96), torch.randn(1, 1600)
    network, skipped = render.attach_lora(sd.unet, run_dir / "demo-000002.safetensors")
    assert len(network.modules) == len(names.attention_targets(sd.unet)) and skipped == []
    network.set_multiplier(0.6)
    with torch.no_grad():
        got = sd.unet(x, t, context, y)
        network.remove()
        base = sd.unet(x, t, context, y)
        tensors = lora_tensors(2)
        for path in names.attention_targets(sd.unet):
            name = names.kohya_name("lora_unet_", path)
            delta = tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"]
            sd.unet.get_submodule(path).weight += 0.6 * 2.0 / 4 * delta
        merged = sd.unet(x, t, context, y)
    assert (got - base).abs().max() > 1e-2
    assert torch.allclose(got, merged, atol=1e-4)


@pytest.mark.slow
def test_grid_three_epochs_by_four_strengths(pipe, run_dir, tmp_path):
    epochs = render.Axis("epoch", tuple(p.stem for p in render.epoch_files(run_dir)))
    assert epochs.values == ("demo-000001", "demo-000002", "demo-000003")
    strengths = render.Axis("strength", STRENGTHS)
    grid_path, singles = render.render_grid(pipe, BASE, epochs, strengths, tmp_path)

    assert len(singles) == 12
    images = {}
    for path in singles:
        info = parse_infotext(Image.open(path).text["parameters"])
        name, weight = re.search(r"<lora:(demo-\d+):([\d.]+)>", info["Prompt"]).groups()
        assert info["Lora hashes"] == f'"{name}: {render.lora_hash(run_dir / f"{name}.safetensors")}"'
        assert (info["Steps"], info["Sampler"], info["Schedule type"], info["CFG scale"], info["Seed"], info["Size"]) == \
               (str(STEPS), "DPM++ 2M", "Karras", "5", "11", f"{SIZE}x{SIZE}")
        assert info["Negative prompt"] == "blurry"
        images[name, float(weight)] = pixels(Image.open(path))

    # every epoch and every strength changes the picture
    for e in epochs.values:
        assert all(np.abs(images[e, a] - images[e, b]).max() > 8 for a, b in zip(STRENGTHS, STRENGTHS[1:]))
    for w in STRENGTHS:
        assert np.abs(images["demo-000001", w] - images["demo-000003", w]).max() > 8

    grid = Image.open(grid_path)
    assert "X/Y plot" in grid.text["parameters"]
    label_w, label_h = grid.width - 3 * SIZE, grid.height - 4 * SIZE
    assert label_w > 0 and label_h > 0
    for i, w in enumerate(STRENGTHS):  # rows are strengths, columns epochs, each cell the single image
        for j, e in enumerate(epochs.values):
            box = (label_w + j * SIZE, label_h + i * SIZE, label_w + (j + 1) * SIZE, label_h + (i + 1) * SIZE)
            assert np.array_equal(pixels(grid.crop(box).convert("RGB")), images[e, w])

    # the same cell rendered alone from its <lora> tag, after other files were loaded, is the same image
    (again, _), = render.render(pipe, render.replace(BASE, prompt=BASE.prompt + " <lora:demo-000002:0.5>"))
    assert np.array_equal(pixels(again), images["demo-000002", 0.5])


@pytest.mark.slow
def test_seeds_reproduce_independent_of_batch(pipe):
    s = render.replace(BASE, sampler="euler_a", seed=40)
    batch = [img for img, _ in render.render(pipe, s, batch_size=2)]
    single = render.render(pipe, render.replace(s, seed=41))[0][0]
    # equal up to the rounding of batched matmuls: at most 2 of 255 levels, where another seed moves far more
    assert np.abs(pixels(batch[1]) - pixels(single)).max() <= 2
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).max() > 8


@pytest.mark.slow
def test_img2img_strength_controls_change(pipe):
    source = render.render(pipe, render.replace(BASE, seed=3))[0][0]
    near = render.render(pipe, render.replace(BASE, seed=4, steps=10, denoising_strength=0.2), init_image=source)
    far = render.render(pipe, render.replace(BASE, seed=4, steps=10, denoising_strength=0.9), init_image=source)
    assert "Denoising strength: 0.2" in near[0][1]
    d_near = np.abs(pixels(near[0][0]) - pixels(source)).mean()
    d_far = np.abs(pixels(far[0][0]) - pixels(source)).mean()
    assert d_near < d_far


def test_sdxl_vae_never_fp16():
    with pytest.raises(render.RenderError, match="fp16"):
        render.load_pipeline(find_model("tiny-sdxl"), vae_dtype="fp16")


def test_cli_sample_and_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "samples"
    args = ["sample", "--prompt", "gssdemo <lora:demo:0.8>", "--lora-dir", str(run_dir), "--steps", "2",
            "--sampler", "ddim", "--seed", "9", "--width", "64", "--height", "64", "--out", str(out)]
    assert cli.main(args) == 0  # the model comes from the file's ss_sd_model_name
    (path,) = out.glob("*.png")
    assert path.name == "00000-9.png"
    info = parse_infotext(Image.open(path).text["parameters"])
    assert (info["Sampler"], info["Model"], info["Seed"]) == ("DDIM", "tiny-sdxl", "9")
    assert cli.main(args[:-6] + ["--width", "65", "--height", "64", "--out", str(out)]) == 2
    assert "multiples of 32" in capsys.readouterr().err


@pytest.mark.slow
def test_checkpoint_file_renders_like_the_built_model(pipe, tmp_path):
    # --model accepts a single-file checkpoint (models.loaders); the same weights give the same image
    from safetensors.torch import save_file

    sd = models.build("tiny-sdxl", seed=0)
    save_file({k: v.contiguous() for k, v in sd.state_dict().items()}, tmp_path / "tiny.safetensors")
    loaded = render.load_pipeline(find_model(str(tmp_path / "tiny.safetensors")))
    s = render.replace(BASE, seed=21)
    (a, text), = render.render(loaded, s)
    (b, _), = render.render(pipe, s)
    assert "Model: tiny," in text
    assert np.array_equal(pixels(a), pixels(b))


def test_cli_grid_of_seed_by_sampler(tmp_path):
    out = tmp_path / "grid"
    args = ["grid", "--model", "tiny-sdxl", "--prompt", "a blue square", "--x", "seed=1,2", "--y", "sampler=euler,ddim",
            "--steps", "2", "--width", "64", "--height", "64", "--out", str(out)]
    assert cli.main(args) == 0
    singles = sorted(out.glob("0*.png"))
    (grid,) = out.glob("xy_grid-*.png")
    assert len(singles) == 4 and Image.open(grid).size[0] > 2 * SIZE
    cells = {(i["Seed"], i["Sampler"]) for i in (parse_infotext(Image.open(p).text["parameters"]) for p in singles)}
    assert cells == {("1", "Euler"), ("2", "Euler"), ("1", "DDIM"), ("2", "DDIM")}


@pytest.mark.slow
def test_cli_grid_of_run_epochs(run_dir, tmp_path):
    out = tmp_path / "grid"
    args = ["grid", "--run", str(run_dir), "--prompt", "gssdemo", "--x", "epoch=1,3", "--y", "strength=0.5,1",
            "--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--out", str(out)]
    assert cli.main(args) == 0  # model from the files' ss_sd_model_name
    prompts = {parse_infotext(Image.open(p).text["parameters"])["Prompt"] for p in out.glob("0*.png")}
    assert prompts == {f"gssdemo <lora:demo-00000{e}:{w}>" for e in (1, 3) for w in ("0.5", "1")}
    assert cli.main(args[:5] + ["--x", "epoch", "--y", "epoch"] + args[9:]) == 2  # the same axis twice
