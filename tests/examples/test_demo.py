"""The bundled demo visibly learns: `gesso train examples/demo.toml`, run as the README says, teaches its pretrained
base the `gssdemo` style, and the previews, `sample` and the epoch x strength grid show it.

The metric: an image's distance to the training set is the mean absolute difference of its 8x8 box-downscaled RGB
pixels (0 to 1) from the nearest training image's. At 8x8 a picture is mostly its background, and the style is in
the background: the base draws flat backgrounds in its own colours, the style an orange-to-purple gradient with a
thick black outline around the shape. (Colour histograms, the other simple choice, were tried first: 64 bins cut
a smooth gradient at arbitrary levels, and one image's distance jumped by 0.3 between neighbouring strengths.)
"""
import contextlib
import io
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gesso import cli
from gesso.engine.sampling import sample as single

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.toml"
IMAGES = sorted((ROOT / "examples" / "demo" / "10_gssdemo").glob("*.png"))
BASE = ROOT / "examples" / "demo-base.safetensors"
PROMPTS = [p.with_suffix(".txt").read_text().strip() for p in IMAGES]  # the trigger captions, e.g. "gssdemo, a red circle"
RENDERED = PROMPTS[::2]  # every other caption: each colour and each shape, half the rendering time
SEED, STEPS = 7, 20


def small(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((8, 8), Image.BOX), dtype=np.float64) / 255


def histogram(image: Image.Image) -> np.ndarray:
    levels = np.asarray(image.convert("RGB"), dtype=np.int64) // 64  # (H, W, 3) in 0..3
    bins = np.bincount((levels[..., 0] * 16 + levels[..., 1] * 4 + levels[..., 2]).ravel(), minlength=64)
    return bins / bins.sum()


TRAINING = [small(Image.open(p)) for p in IMAGES]


def distance(image: Image.Image) -> float:
    """Mean absolute difference of the 8x8 downscale from the nearest training image's."""
    s = small(image)
    return min(float(np.abs(s - t).mean()) for t in TRAINING)


def mean_distance(images) -> float:
    return float(np.mean([distance(im) for im in images]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The demo as the README runs it (its own config, unchanged), into a temporary folder with its cache there."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["train", str(DEMO), "--output-dir", str(out), "--set", f"dataset.cache_dir='{out.parent / 'cache'}'"])
    assert code == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def renders(run):
    """Trigger captions at one seed: the base alone and the last epoch's file at strength 1 (six captions), and at
    strength 0 (the first three, each to be equal to the base's)."""
    pipe = single.open_pipeline(str(BASE), [], run[0], device="cpu")
    out = {}
    for label, tag, prompts in (("base", "", RENDERED), ("s0", " <lora:demo-000009:0>", RENDERED[:3]),
                                ("s1", " <lora:demo-000009:1>", RENDERED)):
        out[label] = [single.render_batch(pipe, single.settings_for(pipe, p + tag, steps=STEPS, seed=SEED))[0]
                      for p in prompts]
    return out


def test_the_base_knows_shapes_but_not_the_style():
    # the base's own world: a flat shape on a flat background, as captioned; its training pictures are drawn by
    # examples/make_demo.py's base_picture, whose six colours the histogram separates
    pipe = single.open_pipeline(str(BASE), [], device="cpu")
    image = single.render_batch(pipe, single.settings_for(pipe, "a red square on a blue background", steps=STEPS, seed=SEED))[0]
    h = histogram(image)
    red, blue = 3 * 16 + 0 * 4 + 0, 0 * 16 + 1 * 4 + 3  # (220, 40, 40) and (40, 80, 220) in 64-levels
    assert h[red] > 0.04 and h[blue] > 0.3, f"red {h[red]:.2f}, blue {h[blue]:.2f}"


@pytest.mark.slow
def test_strength_one_draws_the_style_and_strength_zero_is_the_base(renders):
    base, s1 = (mean_distance(renders[k]) for k in ("base", "s1"))
    assert s1 <= 0.7 * base, f"distance to the training images: base {base:.3f}, LoRA {s1:.3f}: less than 30% closer"
    assert len(renders["s0"]) == 3
    for a, b in zip(renders["base"], renders["s0"], strict=False):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # strength 0 is the base, bit for bit


@pytest.mark.slow
def test_the_epoch_by_strength_grid_grows_along_strength(run):
    # the grid command the run printed, as a user copies it, at a fixed seed on the CPU
    out, printed = run
    line = re.search(r"^compare epochs and strengths: python cli\.py (grid .*)$", printed, re.M).group(1)
    args = shlex.split(line)
    assert args[args.index("--run") + 1] == str(out) and args[args.index("--prompt") + 1] == "gssdemo, a blue circle"
    strengths = (0.25, 0.5, 0.75, 1.0)
    assert args[args.index("--y") + 1] == "strength=0.25,0.5,0.75,1"
    assert cli.main(args + ["--seed", str(SEED), "--device", "cpu"]) == 0
    grids = sorted((out / "grids").glob("xy_grid-*.png"))
    assert len(grids) == 1
    cells: dict[tuple[int, float], float] = {}
    for path in (out / "grids").glob("0*.png"):
        with Image.open(path) as im:
            epoch, weight = re.search(r"<lora:demo-(\d+):([\d.]+)>", im.info["parameters"]).groups()
            cells[int(epoch), float(weight)] = distance(im)
    epochs = sorted({e for e, _ in cells})
    assert epochs == [3, 6, 9] and len(cells) == 12
    for e in epochs:
        row = [cells[e, s] for s in strengths]
        assert all(a > b for a, b in zip(row, row[1:])), f"epoch {e}: distances {row} do not fall with strength"
    assert cells[9, 1.0] < cells[3, 1.0], "the last epoch is no closer than the first"
    shutil.copy(grids[0], out / "grid.png")  # kept beside the run for a look


@pytest.mark.slow
def test_previews_of_the_run_show_the_style(run):
    previews = sorted((run[0] / "samples").glob("demo-e*-*.png"))
    assert [p.name for p in previews] == [f"demo-e{e:06d}-{i:02d}.png" for e in (3, 6, 9) for i in (0, 1)]
    first, last = (mean_distance(Image.open(p) for p in previews if f"-e{e:06d}-" in p.name) for e in (3, 9))
    assert last < first, f"previews: epoch 3 at {first:.3f}, epoch 9 at {last:.3f} from the training images"
