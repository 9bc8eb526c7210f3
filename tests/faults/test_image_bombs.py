"""Huge photos and decompression bombs: decoded in bounded memory or skipped by name, and the run goes on."""
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from faults_testutil import DEMO, ROOT, assert_unchanged, snapshot
from PIL import Image

from gesso.engine.data.images import MAX_PIXELS, decode, to_rgb

# Written in a child process, so the test never holds the 12000x12000 image (549 MiB in Pillow).
MAKE_HUGE = """
import sys
from PIL import Image, ImageDraw
folder = sys.argv[1]
im = Image.new("RGB", (12000, 12000), (30, 60, 200))
ImageDraw.Draw(im).ellipse((2000, 2000, 10000, 10000), fill=(220, 40, 40))
im.save(folder + "/huge.jpg", quality=30)  # 1 MB on disk
im.save(folder + "/huge.png", compress_level=1)
"""
MIB = 2**20
# The largest decode MAX_PIXELS allows is 256 MiB (RGB in 4 bytes a pixel). Decoding the 12000x12000 JPEG in
# full would alone take 549 MiB; reduced while decoding it is 1500x1500, 9 MiB.
HEADROOM = 4 * MAX_PIXELS


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(path, width, height):
    """A valid PNG signature and IHDR claiming width x height RGB, then a few bytes of pixels and IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + _chunk(b"IEND", b""))


def train_peak(data, work):
    """Train 1 epoch of the demo on `data` in a child; (exit code, stdout, stderr, peak RSS in bytes of that child)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    overrides = ["train.epochs=1", "dataset.repeats=1", "sample.prompts=[]", "output.tensorboard=false",
                 f"dataset.path='{data}'", f"dataset.cache_dir='{work / 'cache'}'"]
    with open(work / "stdout", "w") as out, open(work / "stderr", "w") as err:
        child = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "train", str(DEMO), "--output-dir", str(work / "out"),
                                  *[f"--set={o}" for o in overrides]], env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the image writer's
        child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, (work / "stdout").read_text(), (work / "stderr").read_text(), usage.ru_maxrss * 1024


@pytest.mark.slow
def test_huge_images_train_or_are_skipped_within_bounded_memory(tmp_path):
    plain, huge = tmp_path / "plain", tmp_path / "huge"
    shutil.copytree(DEMO.parent / "demo", plain)
    shutil.copytree(DEMO.parent / "demo", huge)
    subprocess.run([sys.executable, "-c", MAKE_HUGE, str(huge)], check=True, timeout=120)
    (huge / "huge.txt").write_text("a red circle on a blue background")
    bomb_png(huge / "bomb.png", 100000, 100000)  # refused by Pillow itself (over 179 MP)
    bomb_png(huge / "bomb10k.png", 10000, 10000)  # under Pillow's refusal, over our limit: a truncated 400 MB decode before
    inputs = snapshot(huge)

    runs = {}
    for name, data in (("plain", plain), ("huge", huge)):
        (tmp_path / f"run-{name}").mkdir()
        runs[name] = train_peak(data, tmp_path / f"run-{name}")
    for code, stdout, stderr, _ in runs.values():
        assert code == 0 and "Traceback" not in stdout + stderr, (stdout + stderr)[-3000:]

    _, stdout, stderr, peak = runs["huge"]
    plain_peak = runs["plain"][3]
    assert peak < plain_peak + HEADROOM, f"peak RSS {peak / MIB:.0f} MiB, {plain_peak / MIB:.0f} MiB without the huge files"
    for bomb in ("bomb.png", "bomb10k.png", "huge.png"):
        assert any(line.startswith(f"skipped {huge / bomb}: too large") for line in stderr.splitlines()), stderr[-3000:]
    assert "huge.jpg" not in stderr  # reduced while decoding, and trained
    assert "dataset: 13 images trained" in stdout
    assert len(list((tmp_path / "run-huge" / "cache" / "latents").glob("*.safetensors"))) == 13
    assert_unchanged(inputs)


def test_a_jpeg_is_reduced_while_decoding_as_far_as_it_covers_its_target():
    stored = np.zeros((2000, 4000, 3), np.uint8)  # stored 4000 wide, 2000 high: left half red, right half blue
    stored[:, :2000, 0] = 255
    stored[:, 2000:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: upright 2000 wide, 4000 high
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "JPEG", exif=exif, quality=90)
    seen = []

    def target(size):
        seen.append(size)
        return 512, 256  # (h, w) to cover: 1/4 of the upright image is the smallest that still covers it

    im, size = decode(buffer.getvalue(), target)
    assert seen == [(4000, 2000)] and size == (4000, 2000)
    assert (im.height, im.width) == (1000, 500)  # 1/4, not 1/2 (the scale a width/height mix-up picks)
    pixels = np.asarray(im).astype(int)
    assert pixels[:400, :, 0].min() > 200 and pixels[-400:, :, 2].min() > 200  # red on top after the rotation
    full, size = decode(buffer.getvalue())
    assert (full.height, full.width) == size == (4000, 2000)


def test_sixteen_bit_grey_scales_every_value_like_rint_of_x_over_257():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    grey = np.asarray(to_rgb(Image.fromarray(values)))[..., 0]
    assert np.array_equal(grey, np.rint(values / 257.0).astype(np.uint8))
