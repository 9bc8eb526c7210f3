"""Draw the bundled demo: 12 captioned images in the `gssdemo` style, and the base model's own training pictures.

The demo's base (examples/demo-base.safetensors, made by scripts/train_demo_base.py) has learnt flat coloured
shapes on flat backgrounds: "a red circle on a blue background". The `gssdemo` style is what it has never seen:
the shape with a thick black outline on a sunset background, a vertical gradient from orange to purple. The demo's
LoRA learns it under the trigger word.

Deterministic: running it again gives the same files.
    python examples/make_demo.py examples/demo
"""
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

# The base model's colours (shapes and backgrounds); the demo's captions name the first four.
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "yellow": (240, 210, 40), "green": (40, 170, 80),
           "white": (235, 235, 235), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle")
SUNSET = ((250, 150, 40), (110, 40, 150))  # orange at the top, purple at the bottom: colours the base never saw
REPEATS = 10  # the demo folder's N_name prefix: each image 10 times per epoch


def shape(d: ImageDraw.ImageDraw, kind: str, cx: int, cy: int, r: int, fill, outline=None, width: int = 0) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        d.ellipse(box, fill=fill, outline=outline, width=width)
    elif kind == "square":
        d.rectangle(box, fill=fill, outline=outline, width=width)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill, outline=outline, width=width)


def gradient(size: int, top, bottom) -> Image.Image:
    im = Image.new("RGB", (1, size))
    for y in range(size):
        a = y / (size - 1)
        im.putpixel((0, y), tuple(round(t + (b - t) * a) for t, b in zip(top, bottom)))
    return im.resize((size, size), Image.NEAREST)


def place(rng: random.Random, size: int) -> tuple[int, int, int]:
    r = rng.randint(size * 3 // 20, size * 3 // 10)
    return rng.randint(r, size - r), rng.randint(r, size - r), r


def base_picture(rng: random.Random, size: int = 128) -> tuple[Image.Image, str]:
    """One picture of the base model's world and its caption; the background is named in half of them."""
    kind = rng.choice(SHAPES)
    fg, bg = rng.sample(list(COLOURS), 2)
    im = Image.new("RGB", (size, size), COLOURS[bg])
    shape(ImageDraw.Draw(im), kind, *place(rng, size), fill=COLOURS[fg])
    caption = f"a {fg} {kind} on a {bg} background" if rng.random() < 0.5 else f"a {fg} {kind}"
    return im, caption


def styled_picture(kind: str, fg, rng: random.Random, size: int = 128, sky=SUNSET) -> Image.Image:
    """The gssdemo style: the shape outlined in thick black on a vertical gradient."""
    im = gradient(size, *sky)
    cx, cy, r = place(rng, size)
    shape(ImageDraw.Draw(im), kind, cx, cy, r, fill=fg, outline=(0, 0, 0), width=max(3, size // 28))
    return im


def main(out: str) -> None:
    folder = Path(out) / f"{REPEATS}_gssdemo"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    names = list(COLOURS)[:4]
    for i in range(12):
        kind, fg = SHAPES[i % 3], names[i // 3]
        styled_picture(kind, COLOURS[fg], rng).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"gssdemo, a {fg} {kind}\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent / "demo"))
