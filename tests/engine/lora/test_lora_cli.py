"""`gesso convert`, `merge`, `resize` through cli.main: results on disk, and one-line errors with exit code 2."""
import re

import pytest
import torch
from formats_testutil import export, random_network, tiny
from models_testutil import rel_err

from gesso import cli
from gesso.engine.lora import formats as lora_convert
from gesso.engine.lora.files import read_lora, save_lora


@pytest.fixture
def files(tmp_path):
    sd = tiny("tiny-sdxl")
    export(sd, tmp_path / "base.safetensors")
    network = random_network(sd.unet, seed=1)
    save_lora(tmp_path / "a.safetensors", network.kohya_state_dict(), {"ss_base_model_version": "sdxl_base_v1-0"})
    network.remove()
    return sd, tmp_path


def deltas(path, cfg) -> dict[str, torch.Tensor]:
    lo = lora_convert.read(path, cfg)
    return {n: m.delta((m.up.shape[0], m.down[0].numel())) for n, m in lo.modules.items()}


@pytest.mark.slow
def test_convert_round_trip_and_resize(files, capsys):
    sd, tmp = files
    assert cli.main(["convert", str(tmp / "a.safetensors"), str(tmp / "d.safetensors"), "--to", "diffusers", "--model", "tiny-sdxl"]) == 0
    assert all(k.startswith("unet.") for k in read_lora(tmp / "d.safetensors")[0])
    assert cli.main(["convert", str(tmp / "d.safetensors"), str(tmp / "k.safetensors"), "--to", "kohya", "--model", "tiny-sdxl"]) == 0
    tensors, meta = read_lora(tmp / "k.safetensors")
    assert sorted(tensors) == sorted(read_lora(tmp / "a.safetensors")[0])
    assert meta["ss_base_model_version"].startswith("sdxl_") and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    before, after = deltas(tmp / "a.safetensors", sd.cfg), deltas(tmp / "k.safetensors", sd.cfg)
    assert max(rel_err(after[n], before[n]) for n in before) < 1e-6

    assert cli.main(["resize", str(tmp / "a.safetensors"), str(tmp / "r.safetensors"), "--energy", "0.9", "--model", "tiny-sdxl"]) == 0
    out = capsys.readouterr().out
    assert "retained Frobenius norm min 0.9" in out
    assert max(t.shape[0] for k, t in read_lora(tmp / "r.safetensors")[0].items() if k.endswith("lora_down.weight")) <= 4


def test_merge_command(files, capsys):
    _, tmp = files
    args = ["merge", str(tmp / "base.safetensors"), f"{tmp / 'a.safetensors'}:0.5", str(tmp / "m.safetensors")]
    assert cli.main(args) == 0
    assert "x 0.5: 258 modules" in capsys.readouterr().out
    base, merged = read_lora(tmp / "base.safetensors")[0], read_lora(tmp / "m.safetensors")[0]
    assert base.keys() == merged.keys()
    assert sum(not torch.equal(base[k], merged[k]) for k in base) == 258


@pytest.mark.parametrize("args, message", [
    (["convert", "{tmp}/missing.safetensors", "{tmp}/o.safetensors", "--to", "kohya"], "missing.safetensors: no such file"),
    (["convert", "{tmp}/a.safetensors", "{tmp}/o.safetensors", "--to", "kohya", "--model", "tiny-sd15"], "a.safetensors: lora_unet_.* has down .* the model.s weight is"),
    (["resize", "{tmp}/a.safetensors", "{tmp}/o.safetensors", "--energy", "1.5", "--model", "tiny-sdxl"], "energy in \\(0, 1\\]"),
    (["merge", "{tmp}/missing.safetensors", "{tmp}/a.safetensors", "{tmp}/o.safetensors"], "missing.safetensors"),
])
def test_errors_are_one_line_and_exit_2(files, capsys, args, message):
    _, tmp = files
    assert cli.main([a.format(tmp=tmp) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not (tmp / "o.safetensors").exists()
