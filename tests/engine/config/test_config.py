import subprocess
import sys
from pathlib import Path

import pytest

from gesso.engine.config.load import build_config, load_config
from gesso.engine.lora import lycoris
from gesso.engine.optim import OPTIMIZERS
from gesso.engine.sampling.samplers import SAMPLERS
from gesso.engine.schedules import SCHEDULES
from gesso.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


def write(tmp_path, text):
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_demo_config_resolves_dataset_next_to_the_file():
    cfg = load_config(ROOT / "examples" / "demo.toml")
    assert Path(cfg.dataset.path) == ROOT / "examples" / "demo"
    assert Path(cfg.model.checkpoint) == ROOT / "examples" / "demo-base.safetensors"
    assert cfg.dataset.trigger == "gssdemo"


def test_demo_config_leaves_the_repeats_to_its_folder():
    """Copied for one's own data, the demo config must not override `N_name` folders: its own folder carries them."""
    cfg = load_config(ROOT / "examples" / "demo.toml")
    assert cfg.dataset.repeats == 0
    assert [p.name for p in (ROOT / "examples" / "demo").iterdir() if p.is_dir() and not p.name.startswith(".")] == ["10_gssdemo"]


def test_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, '[dataset]\npath = "data"\nresolution = 64\n'),
                      ["train.learning_rate=3e-4", "output.name=my lora", "train.epochs=2", "network.alpha=4"])
    assert cfg.train.learning_rate == 3e-4 and cfg.output.name == "my lora" and cfg.train.epochs == 2
    assert cfg.network.alpha == 4.0 and isinstance(cfg.network.alpha, float)


@pytest.mark.parametrize("text, overrides, message", [
    ('[dataset]\npath = "data"\n[train]\nepoch = 3\n', [], "unknown key train.epoch"),  # typo in a key
    ('[dataset]\npath = "data"\n[trian]\n', [], "unknown section [trian]"),  # typo in a section
    ('[dataset]\npath = "data"\n', ["train.epochs=three"], "train.epochs: expected int"),  # wrong type
    ('[dataset]\npath = "missing"\n', [], "dataset.path: no such folder"),  # missing dataset
    ('[dataset]\npath = "data"\nresolution = 100\n', [], "multiple of 64"),
    ('[dataset]\npath = "data"\n[output]\nsave_dtype = "fp8"\n', [], "output.save_dtype"),
    ('[dataset]\npath = "data"\n', ["train.lr=1"], "unknown key train.lr"),  # typo in an override
])
def test_bad_config_names_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text), overrides)


@pytest.mark.slow
def test_cli_reports_bad_key_in_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, '[dataset]\npath = "data"\n[train]\nepoch = 3\n')
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown key train.epoch" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_reports_missing_config_file(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", str(tmp_path / "nope.toml")], capture_output=True, text=True)
    assert proc.returncode == 2 and "nope.toml: no such config file" in proc.stderr


@pytest.mark.parametrize("section, key, registry", [
    ("train", "optimizer", OPTIMIZERS),
    ("train", "lr_scheduler", SCHEDULES),
    ("sample", "sampler", SAMPLERS),
    ("network", "type", {"lora": None, **dict.fromkeys(lycoris.ALGOS), "embedding": None}),
])
def test_a_name_key_takes_exactly_its_registry_s_names(tmp_path, section, key, registry):
    for name in registry:  # every entry of the registry is a value the config takes
        assert getattr(getattr(build_config({"dataset": {"path": str(tmp_path)}, section: {key: name}}), section), key) == name
    with pytest.raises(ConfigError) as info:
        build_config({section: {key: "none_of_them"}}, "run.toml")
    assert str(info.value) == f"run.toml: {section}.{key} = 'none_of_them', expected one of {', '.join(registry)}"


def test_build_config_makes_the_checks_load_config_makes(tmp_path, monkeypatch):
    path = write(tmp_path, '[model]\ncheckpoint = "models/base.safetensors"\n[dataset]\npath = "data"\ncache_dir = "cache"\n')
    data = {"model": {"checkpoint": "models/base.safetensors"}, "dataset": {"path": "data", "cache_dir": "cache"}}
    # the same dict as the same file: relative paths resolved against the file's folder, given as `base`
    assert build_config(data, str(path), base=tmp_path) == load_config(path)
    monkeypatch.chdir(tmp_path)  # without a base, against the current folder, as a host's relative paths mean
    cfg = build_config(data)
    assert cfg.dataset.path == str(tmp_path / "data") and cfg.dataset.cache_dir == str(tmp_path / "cache")
    assert cfg.model.checkpoint == str(tmp_path / "models" / "base.safetensors")
    assert build_config({**data, "model": {"checkpoint": "someone/sdxl-finetune"}}).model.checkpoint == "someone/sdxl-finetune"


@pytest.mark.parametrize("data, message", [
    ({}, "config: dataset.path is required"),
    ({"train": {"epochs": 2}}, "config: dataset.path is required"),
    ({"dataset": {"path": "missing"}}, "config: dataset.path: no such folder: {tmp}/missing"),
    ({"dataset": {"path": "data", "mask_dir": "masks"}, "loss": {"masked": True}},
     "config: dataset.mask_dir: no such folder: {tmp}/masks"),
    ({"dataset": {"subsets": [{"path": "other"}]}}, "config: dataset.subsets[0].path: no such folder: {tmp}/other"),
])
def test_build_config_refuses_a_missing_dataset_in_one_line(tmp_path, monkeypatch, data, message):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        build_config(data)
    assert str(info.value) == message.format(tmp=tmp_path)
