"""v-prediction and zero terminal SNR read from a checkpoint, as ComfyUI reads them (supported_models.SDXL.model_type:
a `v_pred` marker key, and `ztsnr` beside it), and from a diffusers folder's scheduler config."""
import json

import pytest
import torch
from models_testutil import write_diffusers_folder
from safetensors.torch import save_file

from gesso import models
from gesso.models.loaders import CheckpointError, load_model, open_checkpoint

MARKER = torch.tensor([])  # NoobAI V-Pred stores its markers as empty tensors; only the key names matter


def state_of(name: str) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in models.build(name, seed=5).state_dict().items()}


@pytest.mark.parametrize("markers,prediction,ztsnr", [
    ((), "epsilon", False),  # plain SDXL
    (("v_pred",), "v_prediction", False),  # a v-prediction fine-tune
    (("v_pred", "ztsnr"), "v_prediction", True),  # NoobAI-XL V-Pred
    (("ztsnr",), "epsilon", False),  # ComfyUI reads ztsnr only beside v_pred
])
def test_single_file_markers(tmp_path, markers, prediction, ztsnr):
    state = state_of("tiny-sdxl")
    save_file(state | {k: MARKER for k in markers}, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    assert (ckpt.config.prediction, ckpt.config.zero_terminal_snr) == (prediction, ztsnr)
    model = load_model(tmp_path / "m.safetensors")
    assert (model.cfg.prediction, model.cfg.zero_terminal_snr) == (prediction, ztsnr)
    assert model.state_dict().keys() == state.keys()  # the markers are not weights


def test_sd15_single_file_with_v_pred_marker(tmp_path):
    save_file(state_of("tiny-sd15") | {"v_pred": MARKER}, tmp_path / "m.safetensors")
    assert load_model(tmp_path / "m.safetensors").cfg.prediction == "v_prediction"


def test_diffusers_folder_scheduler_config(tmp_path):
    write_diffusers_folder(models.build("tiny-sdxl", seed=5), tmp_path / "pipe", text_model_prefix=True)
    assert open_checkpoint(tmp_path / "pipe").config.prediction == "epsilon"  # no scheduler folder
    (tmp_path / "pipe" / "scheduler").mkdir(exist_ok=True)
    config = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    cfg = load_model(tmp_path / "pipe").cfg
    assert (cfg.prediction, cfg.zero_terminal_snr) == ("v_prediction", True)
    config.write_text(json.dumps({"prediction_type": "sample"}))
    with pytest.raises(CheckpointError, match="scheduler_config.json: prediction_type 'sample' is not supported"):
        open_checkpoint(tmp_path / "pipe")
    config.write_text("{not json")
    with pytest.raises(CheckpointError, match="scheduler_config.json: not valid JSON"):
        open_checkpoint(tmp_path / "pipe")
