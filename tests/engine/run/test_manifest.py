"""gesso-run.json: which config keys make a run, what a folder holding a run's files is to the next run of a config,
and manifests that are not what they should be."""
import dataclasses
import json

import pytest

from gesso.engine.config.load import build_config
from gesso.engine.run import rundir
from gesso.engine.run.manifest import MANIFEST_FILE, differences, fingerprint, read_manifest, run_fields, write_manifest


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "images").mkdir()
    return build_config({"dataset": {"path": "images"}, "output": {"name": "demo"}}, base=tmp_path)


def changed(cfg, section: str, **values):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


# keys that leave the run the same: where, how often and how precisely files are written, previews, the cache's
# place, the device and the memory mode
SAME_RUN = [("output", {"save_every_n_steps": 1, "keep_last": 2, "save_dtype": "bf16", "tensorboard": False,
                        "save_every_n_minutes": 20.0, "timed_lora": True, "save_state": False, "dir": "elsewhere"}),
            ("sample", {"prompts": ["a cat"], "steps": 8}),
            ("dataset", {"cache_dir": "/tmp/cache"}),
            ("train", {"memory": "auto", "gradient_checkpointing": True, "fp8_base": True, "blocks_to_swap": 4, "device": "cpu"})]
ANOTHER_RUN = [("train", {"epochs": 11}, ["train.epochs"]), ("network", {"rank": 4}, ["network.rank"]),
               ("model", {"name": "tiny-sd15"}, ["model.name"]), ("output", {"name": "other"}, ["output.name"]),
               ("train", {"learning_rate": 3e-4, "seed": 1}, ["train.learning_rate", "train.seed"])]


@pytest.mark.parametrize("section, values", SAME_RUN, ids=[s for s, _ in SAME_RUN])
def test_keys_that_only_say_how_files_are_written_keep_the_run(cfg, section, values):
    assert fingerprint(run_fields(changed(cfg, section, **values))) == fingerprint(run_fields(cfg))


@pytest.mark.parametrize("section, values, named", ANOTHER_RUN, ids=[n[0] for _, _, n in ANOTHER_RUN])
def test_keys_that_change_what_is_trained_make_another_run_named(cfg, tmp_path, section, values, named):
    write_manifest(tmp_path, cfg)
    manifest = read_manifest(tmp_path)
    assert differences(manifest, cfg) == []
    assert differences(manifest, changed(cfg, section, **values)) == named


def test_a_key_a_later_version_added_counts_at_its_default(cfg, tmp_path):
    write_manifest(tmp_path, cfg)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    del manifest["config"]["loss.masked"]  # written before the key existed
    manifest["fingerprint"] = fingerprint(manifest["config"])
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert differences(read_manifest(tmp_path), cfg) == []
    assert differences(read_manifest(tmp_path), changed(cfg, "loss", masked=True)) == ["loss.masked"]


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '{"config": {}}', '{"fingerprint": 3, "config": {}}',
                                  b"\xff\xfe".decode("latin-1")])
def test_what_is_not_a_manifest_counts_as_none(tmp_path, text):
    (tmp_path / MANIFEST_FILE).write_text(text, encoding="latin-1")
    assert read_manifest(tmp_path) is None


def test_what_a_folder_holds_for_the_next_run(cfg, tmp_path):
    run = tmp_path / "run"
    assert rundir.assess(run, cfg)[0] == rundir.NEW  # not there yet
    run.mkdir()
    write_manifest(run, cfg)
    assert rundir.assess(run, cfg)[0] == rundir.NEW  # a manifest alone: killed before it wrote anything
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "demo-step00000001.safetensors").write_bytes(b"x")
    assert rundir.assess(run, cfg) == (rundir.RESTART, ["demo-step00000001.safetensors", "metrics.jsonl"], [])
    assert rundir.assess(run, changed(cfg, "train", epochs=3))[::2] == (rundir.OTHER, ["train.epochs"])
    (run / "state.pt").write_bytes(b"x")
    assert rundir.assess(run, cfg)[0] == rundir.UNFINISHED
    (run / "demo.safetensors").write_bytes(b"x")
    assert rundir.assess(run, cfg)[0] == rundir.FINISHED
    (run / MANIFEST_FILE).unlink()  # a folder from before manifests: its files decide, as they did
    assert rundir.assess(run, changed(cfg, "train", epochs=3))[0] == rundir.FINISHED
    (run / "demo.safetensors").unlink()
    (run / "state.pt").unlink()
    assert rundir.assess(run, cfg)[0] == rundir.OTHER  # files, no state, no manifest: whose they are is unknown
