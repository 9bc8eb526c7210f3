"""Safetensors files whose header lies (an impossible shape, an unknown dtype, offsets or a header length past the
end of the file) or whose data is cut short: every command that reads one (inspect, convert, merge, resize, sample,
grid, train's checkpoint and resume) gives one `error:` line naming the file and what is wrong, exit 2, and writes
nothing. safetensors itself raises its SafetensorError for most of them, a traceback before they were mapped."""
import json
import shutil
from pathlib import Path

import pytest
from faults_testutil import DEMO, ROOT, assert_one_line_error, gesso_cli, gesso_main, lora_tensors, snapshot

from gesso import models
from gesso.engine.lora.files import save_lora

CHECKPOINT = ROOT / "examples" / "demo-base.safetensors"  # a demo-sdxl single file, 18.5 MB
META = {"ss_sd_model_name": "tiny-sdxl", "ss_base_model_version": "sdxl_base_v1-0"}


def split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def joined(header: dict, data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


def impossible_shape(header: dict, data: bytes, first: str, last: str) -> bytes:
    header[first]["shape"] = [2**20, 2**20]  # 4 TiB or more in the bytes of the real tensor
    return joined(header, data)


def unknown_dtype(header: dict, data: bytes, first: str, last: str) -> bytes:
    header[first]["dtype"] = "F7"
    return joined(header, data)


def offsets_past_the_end(header: dict, data: bytes, first: str, last: str) -> bytes:
    # consistent in itself (a 1-d shape that fills its offsets), but 4 KiB longer than the file's data section
    entry = header[last]
    item = (entry["data_offsets"][1] - entry["data_offsets"][0]) // max(1, _numel(entry["shape"]))
    entry["shape"] = [_numel(entry["shape"]) + 4096 // item]
    entry["data_offsets"][1] += 4096
    return joined(header, data)


def header_length_past_the_end(header: dict, data: bytes, first: str, last: str) -> bytes:
    return joined(header, data, length=len(joined(header, data)))


def truncated_data(header: dict, data: bytes, first: str, last: str) -> bytes:
    return joined(header, data[: len(data) // 2])


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# forgery -> what the error line must say
FORGERIES = {
    impossible_shape: "has shape [1048576, 1048576]",
    unknown_dtype: "has dtype 'F7'",
    offsets_past_the_end: "truncated: tensor",
    header_length_past_the_end: "not a safetensors file (header length",
    truncated_data: "truncated: tensor",
}


def forge(src: Path, dst: Path, forgery) -> Path:
    header, data = split(src.read_bytes())
    tensors = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(forgery(header, data, tensors[0], tensors[-1]))
    return dst


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """lora.safetensors (a kohya LoRA for tiny-sdxl, UNet and both text encoders) and the demo's checkpoint."""
    folder = tmp_path_factory.mktemp("good")
    save_lora(folder / "lora.safetensors", lora_tensors(models.configs.get("tiny-sdxl")), META)
    shutil.copy(CHECKPOINT, folder / "base.safetensors")
    return folder


SMALL = ["--steps", "1", "--sampler", "euler", "--seed", "0", "--width", "64", "--height", "64"]
# command -> (the file it reads that is forged, its arguments given that file and an output folder)
COMMANDS = {
    "inspect a LoRA": ("lora", lambda f, out: ["inspect", f]),
    "inspect a checkpoint": ("checkpoint", lambda f, out: ["inspect", f]),
    "convert": ("lora", lambda f, out: ["convert", f, out / "c.safetensors", "--to", "diffusers", "--model", "tiny-sdxl"]),
    "merge a LoRA": ("lora", lambda f, out: ["merge", CHECKPOINT, f, out / "m.safetensors"]),
    "merge into a checkpoint": ("checkpoint", lambda f, out: ["merge", f, out.parent / "good.safetensors", out / "m.safetensors"]),
    "resize": ("lora", lambda f, out: ["resize", f, out / "r.safetensors", "--rank", "2", "--model", "tiny-sdxl"]),
    "sample with a LoRA tag": ("lora", lambda f, out: ["sample", "--prompt", f"x <lora:{f.stem}:1>", "--lora-dir", f.parent,
                                                       "--model", "tiny-sdxl", "--out", out, *SMALL]),
    "sample a checkpoint": ("checkpoint", lambda f, out: ["sample", "--prompt", "x", "--model", f, "--out", out, *SMALL]),
    "grid of a run's epochs": ("epoch file", lambda f, out: ["grid", "--run", f.parent, "--prompt", "x", "--x", "epoch",
                                                             "--y", "seed=1", "--model", "tiny-sdxl", "--out", out, *SMALL]),
    "train from a checkpoint": ("checkpoint", lambda f, out: ["train", DEMO, "--output-dir", out / "run",
                                                              "--set", f"model.checkpoint='{f}'"]),
    "resume from a checkpoint": ("checkpoint", lambda f, out: ["train", DEMO, "--resume", f.parent / "run",
                                                               "--set", f"model.checkpoint='{f}'"]),
}


def forged_input(good: Path, folder: Path, kind: str, forgery) -> Path:
    """The forged file a command reads, in `folder`, beside what else it needs there."""
    if kind == "checkpoint":
        run = folder / "run"  # an interrupted run's folder for the resume case: it must stay as it is
        run.mkdir(parents=True)
        (run / "state.pt").write_bytes(b"an earlier run's state")
        (run / "metrics.jsonl").write_text('{"step": 1, "epoch": 1, "loss": 0.5, "lr": 0.001}\n')
        return forge(good / "base.safetensors", folder / "forged.safetensors", forgery)
    if kind == "epoch file":
        return forge(good / "lora.safetensors", folder / "demo-000001.safetensors", forgery)
    return forge(good / "lora.safetensors", folder / "forged.safetensors", forgery)


@pytest.mark.parametrize("forgery", FORGERIES, ids=[f.__name__ for f in FORGERIES])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_forged_file_is_one_error_line_naming_it(good, tmp_path, command, forgery):
    kind, args = COMMANDS[command]
    forged = forged_input(good, tmp_path / "in", kind, forgery)
    shutil.copy(good / "lora.safetensors", tmp_path / "good.safetensors")
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    line = assert_one_line_error(gesso_main(*args(forged, out)), forged, FORGERIES[forgery])
    assert "SafetensorError" not in line
    assert snapshot(tmp_path) == before  # every file as it was (the forged one too), nothing written: no lock, no manifest


@pytest.mark.slow
def test_through_a_real_process_there_is_no_traceback(good, tmp_path):
    forged = forge(good / "lora.safetensors", tmp_path / "forged.safetensors", impossible_shape)
    assert_one_line_error(gesso_cli("inspect", forged), forged, FORGERIES[impossible_shape])
