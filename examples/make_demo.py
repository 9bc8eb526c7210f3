"""Draw the bundled demo dataset: 12 small images of coloured shapes with captions naming them.

Every caption carries the trigger word `gssdemo`. Deterministic: running it again gives the same files.
    python examples/make_demo.py examples/demo
"""
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "yellow": (240, 210, 40), "green": (40, 170, 80)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, fg: tuple, bg: tuple, width: int, height: int, rng: random.Random) -> Image.Image:
    im = Image.new("RGB", (width, height), bg)
    d = ImageDraw.Draw(im)
    r = rng.randint(height // 5, height // 3)
    cx, cy = rng.randint(r, width - r), rng.randint(r, height - r)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return im


def main(out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    names = list(COLOURS)
    for i in range(12):
        shape = SHAPES[i % len(SHAPES)]
        fg_name, bg_name = names[i % 4], names[(i + 1 + i // 4) % 4]
        width = (128, 160, 144)[i % 3]  # not all square: the loader resizes and centre-crops
        draw(shape, COLOURS[fg_name], COLOURS[bg_name], width, 128, rng).save(folder / f"{i:02d}.png")
        caption = f"gssdemo, a {fg_name} {shape} on a {bg_name} background"
        (folder / f"{i:02d}.txt").write_text(caption + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent / "demo"))
