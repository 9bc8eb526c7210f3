"""kohya's dataset TOML through `train --dataset-config` and load_config(dataset_config=...): keys, precedence, refusals."""
import logging
import shutil
from pathlib import Path

import pytest

from gesso import cli
from gesso.engine.config.load import load_config
from gesso.engine.loop.inputs import load_dataset
from gesso.errors import ConfigError

DEMO = Path(__file__).resolve().parents[3] / "tests" / "data" / "demo.toml"
IMAGES = DEMO.parent / "demo"

KOHYA = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1
flip_aug = true

[[datasets]]
resolution = [512, 512]
batch_size = 2
enable_bucket = true
min_bucket_reso = 320

  [[datasets.subsets]]
  image_dir = 'style'
  num_repeats = 3

  [[datasets.subsets]]
  image_dir = '7_uncaptioned'
  class_tokens = 'hoge girl'
  color_aug = false
"""


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Two image folders, the second without captions, and the kohya file beside them; paths relative to the cwd."""
    shutil.copytree(IMAGES, tmp_path / "style", ignore=shutil.ignore_patterns(".*"))
    (tmp_path / "7_uncaptioned").mkdir()
    for name in ("00.png", "01.png"):
        shutil.copy(IMAGES / name, tmp_path / "7_uncaptioned" / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(folder: Path, text: str) -> Path:
    (folder / "ds.toml").write_text(text)
    return folder / "ds.toml"


def test_the_keys_artists_use_map_onto_gesso(folders, caplog):
    cfg = load_config(DEMO, ["train.epochs=1"], write(folders, KOHYA))
    d = cfg.dataset
    assert d.path == "" and d.subsets == [{"path": str(folders / "style"), "repeats": 3},
                                          {"path": str(folders / "7_uncaptioned"), "repeats": 1, "class_tokens": "hoge girl"}]
    assert (d.resolution, d.bucketing, d.min_bucket_side, d.max_bucket_side) == (512, True, 320, 1024)  # kohya's max default
    assert (d.shuffle_caption, d.keep_tokens, d.flip, d.caption_extension, cfg.train.batch_size) == (True, 1, True, ".txt", 2)
    assert d.trigger == "gssdemo" and cfg.train.epochs == 1  # the Gesso config's own keys and --set stay
    assert not caplog.records  # color_aug = false is kohya's default: nothing to say
    dataset = load_dataset(cfg)
    uncaptioned = [it for it in dataset.items if it.path.parent.name == "7_uncaptioned"]
    # num_repeats, not the 7_ of the folder name, as in kohya; class_tokens caption the images without a caption file
    assert {(it.repeats, it.caption) for it in uncaptioned} == {(1, "gssdemo, hoge girl")}
    assert {it.repeats for it in dataset.items if it.path.parent.name == "style"} == {3}


def test_keys_gesso_lacks_are_one_warning_line_each(folders, caplog):
    text = KOHYA.replace("color_aug = false", "color_aug = true\n  caption_prefix = 'masterpiece, '").replace(
        "[general]", "[general]\nbucket_no_upscale = true")
    with caplog.at_level(logging.WARNING, logger="gesso.kohya"):
        load_config(DEMO, [], write(folders, text))
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" = ")[0].rsplit(" ", 1)[-1] for line in lines] == ["bucket_no_upscale", "color_aug", "caption_prefix"]
    assert all("is not supported by Gesso and is ignored" in line and "\n" not in line for line in lines)


@pytest.mark.parametrize("change, named", [
    (("num_repeats = 3", "num_repeats = 3\n  keep_tokens = 2"),
     "keep_tokens is 2 in datasets[0].subsets[0] but 1 in datasets[0].subsets[1]: Gesso applies one dataset.keep_tokens"),
    (("resolution = [512, 512]", "resolution = [512, 768]"), "resolution = [512, 768]: Gesso's buckets hold"),
    (("num_repeats = 3", "num_repets = 3"), "datasets[0].subsets[0].num_repets: not a kohya dataset option"),
    (("batch_size = 2", "batch_size = '2'"), "datasets[0].batch_size = '2': expected int"),
    (("image_dir = 'style'", "image_dir = 'nowhere'"), "datasets[0].subsets[0].image_dir: no such folder: "),
    (("min_bucket_reso = 320", "min_bucket_reso = 320\n  image_dir = 'style'"), "datasets[0].image_dir: kohya takes it only in [[datasets.subsets]]"),
])
def test_what_would_change_the_meaning_is_refused_naming_it(folders, change, named):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, [], write(folders, KOHYA.replace(*change)))
    assert named in str(info.value) and "\n" not in str(info.value)


def test_train_command_takes_the_file_and_a_kohya_file_as_config_gets_a_hint(folders, capsys):
    path = write(folders, KOHYA)
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown section [datasets]" in err and "pass it as --dataset-config FILE" in err
    assert cli.main(["train", str(DEMO), "--dataset-config", str(path), "--set", "dataset.resolution=1000"]) == 2
    assert "dataset.resolution = 1000: must be a positive multiple of 64" in capsys.readouterr().err  # --set comes last


def test_regularization_subsets_and_alpha_masks_map_to_gesso_keys(folders):
    """kohya's is_reg marks a regularization subset; alpha_mask masks the loss, which kohya does without masked_loss."""
    text = KOHYA.replace("num_repeats = 3", "num_repeats = 3\n  is_reg = true").replace("[general]", "[general]\nalpha_mask = true")
    cfg = load_config(DEMO, [], write(folders, text))
    assert [s.get("is_reg", False) for s in cfg.dataset.subsets] == [True, False]
    assert all(s["alpha_mask"] for s in cfg.dataset.subsets) and cfg.loss.masked
