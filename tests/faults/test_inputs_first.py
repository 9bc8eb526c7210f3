"""Every input is checked before the output folder is touched: in a folder holding a finished run, a mistyped
model name, a missing checkpoint, a missing dataset or a dataset of only broken images is reported as itself
(exit 2, the input's own line), never as the refusal of the used folder, and with `--overwrite` or `--resume auto`
alike every earlier file stays byte-identical, state.pt included."""
import shutil
from pathlib import Path

import pytest
from faults_testutil import DEMO, assert_one_line_error, assert_unchanged, gesso_main, snapshot

from gesso.engine.config.load import load_config
from gesso.engine.loop.train import train

SMALL = ["train.epochs=1", "dataset.repeats=1", "dataset.resolution=64", "sample.prompts=[]", "output.tensorboard=false",
         "output.save_dtype='fp32'"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished run's folder (LoRA files, state.pt, metrics.jsonl, its manifest) and the cache it filled."""
    root = tmp_path_factory.mktemp("finished")
    cfg = load_config(DEMO, [*SMALL, f"dataset.cache_dir='{root / 'cache'}'"])
    train(cfg, root / "run", progress=False)
    return root / "run", root / "cache"


def broken_images(folder: Path) -> Path:
    """Captioned files that are no images: a PNG signature with nothing after it, text named .jpg, an empty .webp."""
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "b.jpg").write_text("not a picture")
    (folder / "c.webp").write_bytes(b"")
    for stem in "abc":
        (folder / f"{stem}.txt").write_text("gssdemo, a shape")
    return folder


# input -> (the override that spoils it, given a scratch folder; what its own error line says)
INPUTS = {
    "unknown model name": (lambda tmp: "model.name='tiny-sdxxl'", "model.name: unknown model config 'tiny-sdxxl'"),
    "missing checkpoint": (lambda tmp: f"model.checkpoint='{tmp / 'gone.safetensors'}'", "model.checkpoint: no such file"),
    "missing dataset": (lambda tmp: f"dataset.path='{tmp / 'no-images'}'", "dataset.path: no such folder"),
    "only broken images": (lambda tmp: f"dataset.path='{broken_images(tmp / 'broken')}'", "dataset: no trainable images"),
}
MODES = {"plain": [], "overwrite": ["--overwrite"], "resume auto": ["--resume", "auto"]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spoiled", INPUTS)
def test_a_bad_input_is_reported_before_the_used_folder(finished, tmp_path, spoiled, mode):
    folder, cache = finished
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    before = snapshot(run)
    assert {p.name for p in before} >= {"demo.safetensors", "demo-000001.safetensors", "state.pt", "metrics.jsonl",
                                        "gesso-run.json"}
    override, says = INPUTS[spoiled]
    sets = [*SMALL, f"dataset.cache_dir='{cache}'", override(tmp_path)]
    proc = gesso_main("train", DEMO, "--output-dir", run, *[a for s in sets for a in ("--set", s)], *MODES[mode])
    line = assert_one_line_error(proc, says)
    assert "--overwrite" not in line and "earlier run" not in line  # the input's error, not the folder's
    assert_unchanged(before)
    assert snapshot(run).keys() == before.keys()  # nothing added: no lock file left, no log
