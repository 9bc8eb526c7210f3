"""Training previews from one short demo run through the CLI: the infotext names the epoch's LoRA file and hash,
each preview reaches TensorBoard as an image, the bar says it is rendering, and the run ends with the next commands."""
import io
import struct
from pathlib import Path

import pytest
from PIL import Image
from tensorboardX.proto.event_pb2 import Event

from gesso import cli
from gesso.engine.sampling.render import lora_hash

DEMO = Path(__file__).resolve().parents[3] / "tests" / "data" / "demo.toml"


def events(folder: Path) -> list[Event]:
    """Every event in a TensorBoard folder: TFRecords of length (8 bytes), its crc (4), data, data crc (4)."""
    out = []
    for path in sorted(folder.glob("events*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at : at + 8])
            out.append(Event.FromString(data[at + 12 : at + 12 + n]))
            at += 12 + n + 4
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "demo"
    cache = out.parent / "cache"  # not the demo folder's own cache: its latents are encoded, under the bar, in this run
    capture = pytest.MonkeyPatch()
    stdout, stderr = io.StringIO(), io.StringIO()
    capture.setattr("sys.stdout", stdout)
    capture.setattr("sys.stderr", stderr)
    try:
        code = cli.main(["train", str(DEMO), "--output-dir", str(out), "--set", "train.epochs=2", "--set", "dataset.repeats=1",
                         "--set", "dataset.resolution=64", "--set", f"dataset.cache_dir='{cache}'",
                         "--set", "sample.steps=2", "--set", "sample.every_n_epochs=1",
                         "--set", "output.save_every_n_epochs=2", "--set", 'sample.prompts=["gssdemo, a circle --n dull", "gssdemo"]'])
    finally:
        capture.undo()
    assert code == 0, stderr.getvalue()[-2000:]
    return out, stdout.getvalue(), stderr.getvalue()


@pytest.mark.slow
def test_preview_infotext_names_the_saved_epoch_file_and_its_hash(run):
    out, _, _ = run
    text = Image.open(out / "samples" / "demo-e000002-00.png").info["parameters"]
    prompt, negative, fields = text.split("\n")
    assert prompt == "gssdemo, a circle <lora:demo-000002:1>" and negative == "Negative prompt: dull"
    assert f"Lora hashes: \"demo-000002: {lora_hash(out / 'demo-000002.safetensors')}\"" in fields
    # epoch 1 saved no file (save_every_n_epochs = 2): nothing to name
    assert "<lora:" not in Image.open(out / "samples" / "demo-e000001-00.png").info["parameters"]


def test_previews_reach_tensorboard_as_images(run):
    out, _, _ = run
    images = [(e.step, v.tag, v.image) for e in events(out / "tensorboard") for v in e.summary.value if v.HasField("image")]
    assert sorted((step, tag) for step, tag, _ in images) == [(12 // 4 * s, f"preview/{i:02d}") for s in (1, 2) for i in (0, 1)]
    step, tag, picture = images[-1]
    png = Image.open(io.BytesIO(picture.encoded_image_string))
    assert (png.size, picture.width, picture.height) == ((64, 64), 64, 64)
    saved = Image.open(out / "samples" / f"demo-e000002-{tag[-2:]}.png")
    assert png.tobytes() == saved.convert("RGB").tobytes()


@pytest.mark.slow
def test_the_bar_says_it_renders_previews_and_the_run_ends_with_the_next_commands(run):
    out, stdout, stderr = run
    assert "rendering previews 1/2" in stderr and "rendering previews 2/2" in stderr
    assert "caching latents" in stderr
    assert f"previews: 4 images in {out / 'samples'}" in stdout
    assert (f"python cli.py grid --run {out} --prompt 'gssdemo, a circle --n dull' --x epoch --y strength=0.25,0.5,0.75,1"
            " --steps 2") in stdout
    assert f"tensorboard --logdir {out / 'tensorboard'}" in stdout
