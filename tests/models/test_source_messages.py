"""Messages that name the cause when a model source cannot be found: a missing path is a missing file, not a Hub id."""
import pytest

from gesso.cli import main
from gesso.engine.config.load import load_config
from gesso.models.loaders import CheckpointError, looks_like_path, resolve


@pytest.mark.parametrize("source, path", [
    ("models/mine.safetensors", True),  # an extension: a file, though it reads as owner/name
    ("mine.ckpt", True),
    ("./base", True),
    ("a/b/c", True),  # two separators: a Hub id has one
    ("base", True),  # no owner: not a Hub id
    ("stabilityai/stable-diffusion-xl-base-1.0", False),  # ".0" is a version, not an extension
    ("someone/tiny-sdxl", False),
])
def test_what_reads_as_a_path(source, path):
    assert looks_like_path(source) is path


def test_a_missing_relative_checkpoint_names_the_resolved_file(tmp_path):
    """From a config, a relative checkpoint is resolved against the config's folder, and the message shows it."""
    (tmp_path / "data").mkdir()
    config = tmp_path / "run.toml"
    config.write_text('[model]\ncheckpoint = "models/mine.safetensors"\n[dataset]\npath = "data"\n')
    cfg = load_config(config)
    with pytest.raises(CheckpointError) as info:
        resolve(cfg.model.checkpoint)
    assert str(info.value) == f"no such file: {tmp_path / 'models' / 'mine.safetensors'}"


def test_a_hub_id_missing_from_the_cache_suggests_hf_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        resolve("someone/absent", cache_dir=tmp_path / "hub")
    assert "`hf download someone/absent`" in str(info.value) and "huggingface-cli" not in str(info.value)


def test_a_lora_tag_without_a_lora_folder_says_so(capsys):
    assert main(["sample", "--prompt", "a cat <lora:mystyle:0.8>", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "no LoRA folder given" in err and "--lora-dir" in err and "mystyle.safetensors" in err
    assert "--model" not in err
