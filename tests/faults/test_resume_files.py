"""Untrusted state.pt and .ckpt files: a truncated, foreign, forged or malicious file is one error line naming it,
runs no code, and leaves every file in its folder as it was."""
import dataclasses
import io
import pickle
import random
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from faults_testutil import DEMO, assert_one_line_error, assert_unchanged, gesso_cli, snapshot
from safetensors.torch import save as safetensors_bytes

from gesso.engine.config.load import load_config
from gesso.engine.loop.inputs import find_inputs
from gesso.engine.loop.train import prepare_run, train
from gesso.engine.memory.network_setup import train_optimizer
from gesso.engine.run.state import STATE_FILE, load_state, restore
from gesso.engine.schedules import build_schedule
from gesso.errors import TrainError


def short(cache: Path) -> list[str]:
    # 12 images x 1 repeat / batch 4: 3 steps; the template run and every resume use the same network and cache
    return ["train.epochs=1", "dataset.repeats=1", "sample.prompts=[]", "output.tensorboard=false",
            f"dataset.cache_dir='{cache}'"]


def set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


class OpensAFile:
    """Unpickling this calls open(marker, "w"): a file appearing at `marker` means the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A finished one-epoch run of the demo: its folder (LoRA files, metrics.jsonl, state.pt) and its cache."""
    root = tmp_path_factory.mktemp("resume_files")
    train(load_config(DEMO, short(root / "cache")), root / "run", progress=False)
    return root / "run", root / "cache"


def without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


def first_lora_key(state: dict) -> str:
    return next(k for k in state["lora"] if k.endswith(".lora_down.weight"))


def with_lora(state: dict, key: str, value) -> dict:
    lora = {k: v for k, v in state["lora"].items() if k != key}
    return {**state, "lora": lora if value is None else {**lora, key: value}}


def altered_tensor(raw: bytes) -> bytes:
    """One byte of a LoRA tensor's data flipped in place: a zip torch.load still reads without complaint, whose
    record no longer matches the CRC-32 torch.save wrote for it."""
    archive = zipfile.ZipFile(io.BytesIO(raw))
    record = next(r for r in archive.infolist() if "/data/" in r.filename and r.file_size >= 16)
    names, extra = struct.unpack("<HH", raw[record.header_offset + 26 : record.header_offset + 30])
    at = record.header_offset + 30 + names + extra + record.file_size // 2
    return raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]


# each case: the bytes of the bad state.pt from the good one's bytes and content, and what the error line says
CASES = {
    "a tensor's bytes altered": (lambda raw, state: altered_tensor(raw), "no longer match the checksum"),
    "empty": (lambda raw, state: b"", "empty or truncated"),
    "truncated to half": (lambda raw, state: raw[: len(raw) // 2], "damaged"),
    "truncated to 5000 bytes": (lambda raw, state: raw[:5000], "damaged"),
    "random bytes": (lambda raw, state: random.Random(0).randbytes(4096), "not a PyTorch file"),
    "a safetensors file": (lambda raw, state: safetensors_bytes({"lora_unet_a.lora_down.weight": torch.randn(4, 8)}),
                           "not a PyTorch file"),
    "a tensor": (lambda raw, state: torch_bytes(torch.randn(3)), "holds a Tensor"),
    "another dict": (lambda raw, state: torch_bytes({"model": torch.randn(3)}), "no 'lora' entry"),
    "no optimizer": (lambda raw, state: torch_bytes(without(state, "optimizer")), "no 'optimizer' entry"),
    "epoch as a string": (lambda raw, state: torch_bytes({**state, "epoch": "2"}), "'epoch'"),
    "generator of floats": (lambda raw, state: torch_bytes({**state, "generator": torch.randn(5056)}), "'generator'"),
    "lora of lists": (lambda raw, state: torch_bytes({**state, "lora": {"a": [1.0]}}), "'lora'"),
    "optimizer without groups": (lambda raw, state: torch_bytes({**state, "optimizer": {"state": {}}}), "'optimizer'"),
    "scheduler without lr_lambdas": (lambda raw, state: torch_bytes({**state, "scheduler": {"last_epoch": 3}}), "'scheduler'"),
    "files naming an absolute path": (lambda raw, state: torch_bytes({**state, "files": ["/tmp/x.safetensors"]}), "'files'"),
    "lora tensor missing": (lambda raw, state: torch_bytes(with_lora(state, first_lora_key(state), None)), "lora has no"),
    "lora tensor of another shape": (lambda raw, state: torch_bytes(with_lora(state, first_lora_key(state), torch.randn(3, 5))),
                                     "has shape (3, 5)"),
}


def resume(run: Path, cache: Path, *extra: str):
    return gesso_cli("train", DEMO, "--resume", run, *set_args(short(cache) + list(extra)))


def assert_folder_kept(run: Path, before: dict[Path, bytes], bad: bytes) -> None:
    """Every file is still there byte for byte (the bad state.pt too), and the run wrote nothing new."""
    assert_unchanged(before)
    assert (run / STATE_FILE).read_bytes() == bad
    assert set(snapshot(run)) == set(before) | {run / STATE_FILE}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_bad_state_is_one_line_naming_it(tmp_path, template, case):
    folder, cache = template
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    raw = (run / STATE_FILE).read_bytes()
    make, says = CASES[case]
    bad = make(raw, torch.load(run / STATE_FILE, weights_only=True))
    (run / STATE_FILE).write_bytes(bad)
    before = snapshot(run)
    del before[run / STATE_FILE]  # not loadable by design; compared byte for byte below
    line = assert_one_line_error(resume(run, cache, "output.keep_last=1"), STATE_FILE, says)
    assert "weights_only=False" not in line  # never the advice to load it unsafely
    assert_folder_kept(run, before, bad)


@pytest.mark.slow
def test_state_of_another_network_names_the_folder(tmp_path, template):
    folder, cache = template
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    before = snapshot(run)
    assert_one_line_error(resume(run, cache, "network.rank=4"), run, "state was trained with network")
    assert_unchanged(before)


@pytest.mark.slow
def test_listed_file_outside_the_folder_is_never_deleted(tmp_path, template):
    # keep_last deletes the oldest listed files: a forged list must not reach a file elsewhere
    folder, cache = template
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    victim = tmp_path / "victim.safetensors"
    shutil.copy(run / "demo.safetensors", victim)
    state = torch.load(run / STATE_FILE, weights_only=True)
    torch.save({**state, "files": ["../victim.safetensors", "demo-000001.safetensors"]}, run / STATE_FILE)
    before = snapshot(tmp_path)
    assert_one_line_error(resume(run, cache, "output.keep_last=1", "train.epochs=3"), STATE_FILE, "'files'")
    assert_unchanged(before)


def malicious(kind: str, marker: Path, state: dict) -> bytes:
    if kind == "plain pickle":
        return pickle.dumps({**state, "lora": OpensAFile(marker)}, protocol=2)
    if kind == "torch zip":
        return torch_bytes({**state, "lora": OpensAFile(marker)})
    return torch_bytes({**state, "network": {"rank": OpensAFile(marker)}})  # deep inside an otherwise good state


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain pickle", "torch zip", "nested"])
def test_malicious_state_runs_no_code(tmp_path, template, kind):
    folder, cache = template
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    marker = tmp_path / "ran"
    bad = malicious(kind, marker, torch.load(run / STATE_FILE, weights_only=True))
    (run / STATE_FILE).write_bytes(bad)
    before = snapshot(run)
    del before[run / STATE_FILE]
    line = assert_one_line_error(resume(run, cache), STATE_FILE, "could run code")
    assert "weights_only=False" not in line
    assert not marker.exists(), "the pickle ran code"
    assert_folder_kept(run, before, bad)


def evil_checkpoint(folder: Path, kind: str, marker: Path) -> Path:
    path = folder / "evil.ckpt"
    payload = {"state_dict": {"model.diffusion_model.out.2.weight": OpensAFile(marker)}}
    path.write_bytes(pickle.dumps(payload, protocol=2) if kind == "plain pickle" else torch_bytes(payload))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain pickle", "torch zip"])
def test_malicious_ckpt_is_refused_by_inspect(tmp_path, kind):
    marker = tmp_path / "ran"
    ckpt = evil_checkpoint(tmp_path, kind, marker)
    before = snapshot(tmp_path)
    assert_one_line_error(gesso_cli("inspect", ckpt), ckpt, "could run code")
    assert not marker.exists(), "the pickle ran code"
    assert_unchanged(before)
    assert set(snapshot(tmp_path)) == set(before)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain pickle", "torch zip"])
def test_malicious_ckpt_is_refused_by_train(tmp_path, template, kind):
    _, cache = template
    models = tmp_path / "models"
    models.mkdir()
    marker = tmp_path / "ran"
    ckpt = evil_checkpoint(models, kind, marker)
    bad = ckpt.read_bytes()
    out = tmp_path / "out"
    proc = gesso_cli("train", DEMO, "--output-dir", out, *set_args(short(cache) + [f"model.checkpoint='{ckpt}'"]))
    assert_one_line_error(proc, ckpt, "could run code")
    assert not marker.exists(), "the pickle ran code"
    assert ckpt.read_bytes() == bad and snapshot(models) == {ckpt: bad}
    assert not snapshot(out), "a refused run wrote files"


@pytest.fixture(scope="module")
def run_parts(template):
    """A loaded good state, and a builder of this run's network, optimizer, schedule and scaler as train makes them."""
    folder, cache = template
    cfg = load_config(DEMO, short(cache))
    sd, _, network, _ = prepare_run(find_inputs(cfg, torch.device("cpu")))

    def parts(tc=cfg.train, fp16=False):
        opt = train_optimizer(network, tc)
        return opt, build_schedule(tc.lr_scheduler, opt, 3), torch.amp.GradScaler("cpu", enabled=fp16)

    return load_state(folder), network, cfg, parts


def fresh(state: dict) -> dict:
    return pickle.loads(pickle.dumps(state))  # restoring consumes parts of the dict (the schedule's lr_lambdas)


def test_restore_puts_a_good_state_back(run_parts):
    state, network, _, parts = run_parts
    opt, sched, scaler = parts()
    g = torch.Generator()
    pos = restore(fresh(state), network, opt, sched, scaler, g)
    assert (pos.epoch, pos.batch, pos.step) == (state["epoch"], state["batch"], state["step"])
    assert torch.equal(g.get_state(), state["generator"])
    key = first_lora_key(state)
    module = network.modules[key.removesuffix(".lora_down.weight")]
    assert torch.equal(module.lora_down.detach(), state["lora"][key])
    assert sched.last_epoch == state["scheduler"]["last_epoch"]


def test_restore_refuses_another_optimizers_state(run_parts):
    # the run was saved with AdamW; Prodigy would fail at its first step on AdamW's param groups
    state, network, cfg, parts = run_parts
    opt, sched, scaler = parts(dataclasses.replace(cfg.train, optimizer="prodigy", learning_rate=1.0))
    with pytest.raises(TrainError, match="state.pt: the optimizer state is another optimizer's .*amsgrad"):
        restore(fresh(state), network, opt, sched, scaler, torch.Generator())


def test_restore_refuses_a_state_without_loss_scaling_when_fp16(run_parts):
    state, network, _, parts = run_parts
    opt, sched, scaler = parts(fp16=True)
    with pytest.raises(TrainError, match="state.pt: written without fp16 loss scaling"):
        restore(fresh(state), network, opt, sched, scaler, torch.Generator())


def test_restore_refuses_other_parameter_groups(run_parts):
    state, network, _, parts = run_parts
    forged = fresh(state)
    group = forged["optimizer"]["param_groups"][0]
    forged["optimizer"]["param_groups"] = [{**group, "params": group["params"][:10]}, {**group, "params": group["params"][10:]}]
    opt, sched, scaler = parts()
    with pytest.raises(TrainError, match=r"state.pt: optimizer state for parameter groups of \[10, "):
        restore(forged, network, opt, sched, scaler, torch.Generator())


def test_states_without_checksums_still_load(tmp_path, template):
    """A state saved with torch's CRC-32s turned off (every CRC zero) loads as before; so does an intact one."""
    folder, _ = template
    state = load_state(folder)
    with torch.utils.serialization.config.patch({"save.compute_crc32": False}):
        torch.save(state, tmp_path / STATE_FILE)
    assert not any(r.CRC for r in zipfile.ZipFile(tmp_path / STATE_FILE).infolist())
    loaded = load_state(tmp_path)
    assert all(torch.equal(loaded["lora"][k], state["lora"][k]) for k in state["lora"])
    assert load_state(folder)["step"] == state["step"] == 3
