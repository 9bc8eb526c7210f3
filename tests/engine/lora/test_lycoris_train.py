"""`network.type` dora, loha and lokr on the bundled demo: a few steps train, the files hold LyCORIS's keys and
metadata and load back exactly, and an interrupted run resumes to the same tensors."""
import json
import math
from pathlib import Path

import pytest
import torch

from gesso import models
from gesso.engine.config.load import build_config, load_config
from gesso.engine.loop.train import train
from gesso.engine.lora import lycoris
from gesso.engine.lora.files import read_lora
from gesso.engine.lora.network import load_network
from gesso.errors import ConfigError

DEMO = Path(__file__).resolve().parents[3] / "tests" / "data" / "demo.toml"
ZERO_INIT = {"dora": "lora_up.weight", "loha": "hada_w2_a", "lokr": ("lokr_w2_b", "lokr_w2")}  # the half that starts at 0


def short(tmp_path, algo: str, *extra):
    # 12 images x 1 repeat / batch 4 = 3 steps; the LoCon convs (conv_rank 8) are on, as in the demo
    return load_config(DEMO, [f"network.type='{algo}'", "train.epochs=1", "dataset.repeats=1", "sample.prompts=[]",
                              "output.save_dtype='fp32'", f"dataset.cache_dir='{tmp_path / 'cache'}'", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("algo", lycoris.ALGOS)
def test_each_type_trains_saves_and_loads_back(tmp_path, algo):
    result = train(short(tmp_path, algo, "network.lokr_factor=4"), tmp_path / "run")
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    tensors, meta = read_lora(result.final)
    modules = {k.split(".", 1)[0] for k in tensors}
    assert all(k.split(".", 1)[1] in lycoris.SUFFIXES for k in tensors)
    assert all(lycoris.algo_of({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(m + ".")}) == algo
               for m in modules)
    zero = ZERO_INIT[algo] if isinstance(ZERO_INIT[algo], tuple) else (ZERO_INIT[algo],)
    learned = [tensors[f"{m}.{z}"] for m in modules for z in zero if f"{m}.{z}" in tensors]
    assert len(learned) == len(modules) and all(t.abs().sum() > 0 for t in learned)  # every module moved
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == {"dora": "locon", "loha": "loha", "lokr": "lokr"}[algo] and args["conv_dim"] == "8"
    if algo == "lokr":
        assert args["factor"] == "4"
    if algo == "dora":
        assert args["dora_wd"] == "True" and args["wd_on_output"] == "False"

    sd = models.build("tiny-sdxl", seed=0).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x, t, context, y = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 96, generator=g), torch.randn(1, 1600, generator=g)
    with torch.no_grad():
        base = sd.unet(x, t, context, y)
        network = load_network(sd.unet, result.final)
        assert network.kohya_state_dict().keys() == tensors.keys()
        assert all(torch.equal(v, tensors[k]) for k, v in network.kohya_state_dict().items())  # exact round trip
        assert (sd.unet(x, t, context, y) - base).abs().max() > 1e-4


@pytest.mark.slow
def test_dora_on_the_output_axis_is_recorded_and_shaped(tmp_path):
    result = train(short(tmp_path, "dora", "network.dora_wd_on_output=true", "network.conv_rank=0"), tmp_path / "run")
    tensors, meta = read_lora(result.final)
    assert json.loads(meta["ss_network_args"])["wd_on_output"] == "True"
    scales = {k: v for k, v in tensors.items() if k.endswith(".dora_scale")}
    assert scales and all(v.shape == (tensors[k.replace("dora_scale", "lora_up.weight")].shape[0], 1) for k, v in scales.items())


@pytest.mark.slow
def test_resume_after_interrupt_equals_an_uninterrupted_run(tmp_path):
    cfg = short(tmp_path, "loha", "dataset.repeats=2")

    def interrupt(event):
        if event["event"] == "step" and event["step"] == 3:
            raise KeyboardInterrupt

    whole = train(cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", on_event=interrupt)
    resumed = train(cfg, tmp_path / "cut", resume=tmp_path / "cut")
    a, b = read_lora(whole.final)[0], read_lora(resumed.final)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("network, message", [
    ({"type": "lycoris"}, "network.type = 'lycoris', expected one of lora, dora, loha, lokr"),
    ({"type": "loha", "train_text_encoders": True}, "text-encoder training is LoRA"),
])
def test_bad_network_config_is_one_line(network, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"network": network}, "run.toml")
