"""Training never writes a file holding NaN or Inf: the file is refused with one line, and the last good files stay."""
import math

import pytest
import torch
from faults_testutil import DEMO, assert_one_line_error, assert_unchanged, gesso_cli, snapshot, temp_litter

from gesso.engine.config.load import load_config
from gesso.engine.loop.inputs import load_model
from gesso.engine.memory.network_setup import inject_network
from gesso.engine.run.events import Events
from gesso.engine.run.saving import Saver
from gesso.engine.run.state import Position
from gesso.errors import TrainError


@pytest.mark.slow
def test_a_diverged_run_writes_no_file(tmp_path):
    # lr 1e30: the first update's weights are finite in fp32 and overflow fp16, the file's save_dtype
    proc = gesso_cli("train", DEMO, "--output-dir", tmp_path / "run", "--set", "train.learning_rate=1e30",
                     "--set", "output.save_dtype='fp16'", "--set", "output.save_every_n_steps=1", "--set", "train.max_grad_norm=0",
                     "--set", "sample.prompts=[]", "--set", "train.epochs=1", "--set", "dataset.repeats=1",
                     "--set", f"dataset.cache_dir='{tmp_path / 'cache'}'")
    assert_one_line_error(proc, "demo-step00000001.safetensors", "NaN/Inf")
    assert list((tmp_path / "run").glob("*.safetensors")) == [] and not (tmp_path / "run" / "state.pt").exists()


def test_the_last_good_files_stay_when_the_weights_turn_non_finite(tmp_path):
    cfg = load_config(DEMO, ["output.save_dtype='fp32'"])
    sd, _, _ = load_model(cfg)
    network = inject_network(sd.unet, cfg)
    opt = torch.optim.AdamW(network.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    saver = Saver(cfg, tmp_path, network, {}, [], Events(None, 2, torch.device("cpu")))
    pos = Position(2, 0, 1, torch.Generator().get_state())
    saver.intermediate("000001", 1, 1)
    saver.state(opt, sched, scaler, pos)
    before = snapshot(tmp_path)

    with torch.no_grad():
        next(iter(network.modules.values())).lora_up[0, 0] = math.nan
    with pytest.raises(TrainError, match="demo-000002.safetensors: not written, .* holds NaN/Inf at step 2"):
        saver.intermediate("000002", 2, 2)
    with pytest.raises(TrainError, match="state.pt: not written"):
        saver.state(opt, sched, scaler, Position(3, 0, 2, pos.generator))
    assert_unchanged(before)
    assert set(snapshot(tmp_path)) == set(before) and temp_litter(tmp_path) == []
    assert saver.files == ["demo-000001.safetensors"]
