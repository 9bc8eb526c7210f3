"""Zero-terminal-SNR betas against diffusers, kohya's v-loss scaling, and how a run resolves its parameterisation."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from gesso.engine import diffusion
from gesso.engine.config.load import build_config
from gesso.engine.config.sections import LossSection
from gesso.engine.loop import objective, prediction
from gesso.errors import ConfigError, TrainError
from gesso.models import configs

DEMO_IMAGES = Path(__file__).resolve().parents[1] / "data" / "demo"


def test_zero_terminal_snr_betas_equal_diffusers():
    betas = diffusion.scaled_linear_betas()
    ours = diffusion.rescale_zero_terminal_snr(betas)
    # the same float64 betas through diffusers' function: the same algorithm to rounding
    torch.testing.assert_close(ours, diffusers_rescale(betas.clone()), rtol=0, atol=1e-15)
    # and the schedule diffusers trains on (its betas are float32)
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    ac = diffusion.scaled_linear_alphas_cumprod(zero_terminal_snr=True)
    torch.testing.assert_close(ac, ddpm.alphas_cumprod.double(), rtol=0, atol=2e-6)
    assert ac[-1].item() == 0.0  # pure noise at t = T
    assert ac[0].item() == pytest.approx(diffusion.scaled_linear_alphas_cumprod()[0].item(), abs=1e-15)  # t = 0 kept
    assert (ac[1:] < ac[:-1]).all()


def test_v_loss_scaled_like_noise_prediction():
    ac = diffusion.scaled_linear_alphas_cumprod(zero_terminal_snr=True)
    t = torch.tensor([0, 10, 500, 999])
    s = (ac[t] / (1 - ac[t])).clamp(max=1000)  # kohya's get_snr_scale, written out
    torch.testing.assert_close(diffusion.v_like_noise_weight(t, ac), (s / (s + 1)).float())
    assert diffusion.v_like_noise_weight(t, ac)[-1].item() == 0.0  # no weight where no signal is left
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 6, 6, generator=g)
    opts = LossSection(prediction="v_prediction", scale_v_pred_loss_like_noise_pred=True)
    d = objective.draw(x0, opts, ac, g)
    pred = torch.randn(x0.shape, generator=g)
    per_sample = ((pred - d.target) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * diffusion.v_like_noise_weight(d.t, ac)).mean()
    torch.testing.assert_close(objective.loss(pred, d, opts, ac), expected)
    assert not torch.allclose(objective.loss(pred, d, LossSection(prediction="v_prediction"), ac), expected)


def resolved(model_cfg=configs.TINY_SDXL, **sections):
    cfg = build_config({"dataset": {"path": str(DEMO_IMAGES)}, **sections})
    return prediction.resolve(cfg, model_cfg)


def test_auto_follows_the_checkpoint():
    noob = replace(configs.TINY_SDXL, prediction="v_prediction", zero_terminal_snr=True)
    cfg, model_cfg = resolved(noob)
    assert (cfg.loss.prediction, cfg.loss.zero_terminal_snr, cfg.model.prediction) == ("v_prediction", True, "v_prediction")
    assert (model_cfg.prediction, model_cfg.zero_terminal_snr) == ("v_prediction", True)
    cfg, model_cfg = resolved()  # a plain model: epsilon, as every config before these keys trained
    assert (cfg.loss.prediction, cfg.loss.zero_terminal_snr, model_cfg.prediction) == ("epsilon", False, "epsilon")


@pytest.mark.parametrize("sections", [
    {"model": {"prediction": "v_prediction"}},
    {"loss": {"prediction": "v_prediction"}},  # the older key, as configs written before model.prediction say it
    {"model": {"prediction": "v_prediction"}, "loss": {"prediction": "v_prediction"}},
])
def test_override_on_an_epsilon_model(sections):
    sections = {**sections, "loss": {**sections.get("loss", {}), "zero_terminal_snr": True}}
    cfg, model_cfg = resolved(**sections)
    assert (cfg.loss.prediction, cfg.loss.zero_terminal_snr) == ("v_prediction", True)
    assert (model_cfg.prediction, model_cfg.zero_terminal_snr) == ("v_prediction", True)  # previews sample as trained


def test_contradictions_are_one_line():
    with pytest.raises(ConfigError, match="model.prediction, loss.prediction: disagree"):
        build_config({"model": {"prediction": "epsilon"}, "loss": {"prediction": "v_prediction"}})
    with pytest.raises(TrainError, match="loss.zero_terminal_snr needs v-prediction"):
        resolved(loss={"zero_terminal_snr": True})
    with pytest.raises(TrainError, match="scale_v_pred_loss_like_noise_pred applies to v-prediction only"):
        resolved(loss={"scale_v_pred_loss_like_noise_pred": True})
    with pytest.raises(ConfigError, match="model.prediction = 'v'"):
        build_config({"model": {"prediction": "v"}})
