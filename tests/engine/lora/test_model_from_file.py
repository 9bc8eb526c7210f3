"""`convert` and `resize` without --model: the architecture comes from the LoRA's own metadata, as the demo writes it."""
import time
from pathlib import Path

import pytest
import torch
from formats_testutil import export, tiny
from safetensors.torch import save_file

from gesso import cli
from gesso.engine.config.load import load_config
from gesso.engine.loop import prediction
from gesso.engine.loop.inputs import load_dataset, load_model
from gesso.engine.lora import formats as lora_convert
from gesso.engine.lora import tools as lora_tools
from gesso.engine.lora.files import read_lora, save_lora
from gesso.engine.memory.network_setup import inject_network
from gesso.engine.run.metadata import training_metadata
from gesso.errors import LoRAFileError
from gesso.models import configs

DEMO = Path(__file__).resolve().parents[3] / "examples" / "demo.toml"  # the demo on its pretrained base


@pytest.fixture(scope="module")
def demo_lora(tmp_path_factory):
    """A LoRA shaped and labelled as `python cli.py train examples/demo.toml` writes it (its network, LoCon included,
    and its metadata), with random up weights so that every module changes the model."""
    cfg = load_config(DEMO)
    sd, model_cfg, _ = load_model(cfg)
    cfg, model_cfg = prediction.resolve(cfg, model_cfg)  # as train does before it writes metadata
    network = inject_network(sd.unet, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in network.modules.values():
            m.lora_up.copy_(torch.randn(m.lora_up.shape, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("demo") / "demo.safetensors"
    save_lora(path, network.kohya_state_dict(), training_metadata(cfg, model_cfg.family, load_dataset(cfg), time.time()))
    return path, model_cfg


def deltas(path, cfg) -> dict[str, torch.Tensor]:
    return {n: m.delta((m.up.shape[0], m.down[0].numel())) for n, m in lora_convert.read(path, cfg).modules.items()}


@pytest.mark.slow
def test_convert_and_resize_the_demo_lora_without_model(demo_lora, tmp_path, capsys):
    path, model_cfg = demo_lora
    assert lora_tools.model_config(path) == model_cfg  # ss_sd_model_name, not the full-size SDXL of ss_base_model_version
    assert cli.main(["convert", str(path), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert cli.main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    assert f"({model_cfg.name} architecture)" in capsys.readouterr().out
    before, after = deltas(path, model_cfg), deltas(tmp_path / "k.safetensors", model_cfg)
    assert before.keys() == after.keys() and any(n.endswith("in_layers_2") for n in before)  # LoCon modules included
    assert max(((after[n] - before[n]).norm() / before[n].norm()).item() for n in before) < 1e-6

    assert cli.main(["resize", str(path), str(tmp_path / "r.safetensors"), "--rank", "2"]) == 0
    assert "retained Frobenius norm" in capsys.readouterr().out
    ranks = {t.shape[0] for k, t in read_lora(tmp_path / "r.safetensors")[0].items() if k.endswith("lora_down.weight")}
    assert ranks == {2}


@pytest.mark.parametrize("architecture, expected", [
    ("stable-diffusion-v1/lora", configs.SD15), ("stable-diffusion-xl-v1-base/lora", configs.SDXL_BASE),
    ("stable-diffusion-v2-768-v/lora", configs.SD21),
])
def test_modelspec_architecture_names_the_family(tmp_path, architecture, expected):
    # a module name that tells no family by itself
    save_file({"lora_unet_middle_block_1_proj_in.lora_down.weight": torch.zeros(1, 2)}, tmp_path / "x.safetensors",
              metadata={"modelspec.architecture": architecture, "ss_sd_model_name": "sd_xl_base_1.0.safetensors"})
    assert lora_tools.model_config(tmp_path / "x.safetensors") == expected


@pytest.mark.slow
def test_without_a_model_it_cannot_place_the_message_says_pass_model(demo_lora, tmp_path, capsys):
    path, _ = demo_lora
    tensors, meta = read_lora(path)
    meta["ss_sd_model_name"] = "my_base_on_another_machine.safetensors"  # kohya records the trainer's file name
    save_lora(tmp_path / "elsewhere.safetensors", tensors, meta)
    assert cli.main(["resize", str(tmp_path / "elsewhere.safetensors"), str(tmp_path / "o.safetensors"), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert "read as sdxl, guessed from the file" in err and "pass --model" in err and "\n" not in err.strip()
    save_file({"lora_unet_middle_block_1_proj_in.lora_down.weight": torch.zeros(1, 2)}, tmp_path / "bare.safetensors")
    with pytest.raises(LoRAFileError, match="cannot tell which model .*; pass --model"):
        lora_tools.model_config(tmp_path / "bare.safetensors")


@pytest.mark.slow
def test_merge_names_a_lora_made_for_another_family(demo_lora, tmp_path):
    path, _ = demo_lora
    export(tiny("tiny-sd15"), tmp_path / "sd15.safetensors")
    with pytest.raises(LoRAFileError, match="demo.safetensors: a LoRA for sdxl \\(its metadata\\), but .*sd15.safetensors is sd15"):
        lora_tools.merge_lora(tmp_path / "sd15.safetensors", [path], tmp_path / "o.safetensors")
