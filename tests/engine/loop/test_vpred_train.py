"""A NoobAI-style v-prediction, zero-terminal-SNR checkpoint trained with the default (auto) config: the run trains
v on the rescaled schedule, previews with the v denoiser, and writes the metadata sample and grid read back."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gesso import models
from gesso.engine.config.load import load_config
from gesso.engine.loop import objective
from gesso.engine.loop.train import train
from gesso.engine.lora.files import read_lora
from gesso.engine.sampling import render
from gesso.engine.sampling import sample as single
from gesso.errors import RenderError
from gesso.models.lookup import find_model

DEMO = Path(__file__).resolve().parents[3] / "tests" / "data" / "demo.toml"


@pytest.fixture(scope="module")
def vpred_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vpred")
    state = {k: v.contiguous() for k, v in models.build("tiny-sdxl", seed=0).state_dict().items()}
    save_file(state | {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, root / "noob.safetensors")
    overrides = ["train.epochs=1", "dataset.repeats=1", "sample.every_n_epochs=1", "sample.steps=3",
                 f"model.checkpoint='{root / 'noob.safetensors'}'", f"dataset.cache_dir='{root / 'cache'}'"]
    seen = {"draw": set(), "denoiser": set()}
    mp = pytest.MonkeyPatch()
    draw, denoiser = objective.draw, render.sampling.denoiser

    def spy_draw(x0, opts, alphas_cumprod, g):
        seen["draw"].add((opts.prediction, alphas_cumprod[-1].item()))
        return draw(x0, opts, alphas_cumprod, g)

    def spy_denoiser(prediction, model):
        seen["denoiser"].add(prediction)
        return denoiser(prediction, model)

    mp.setattr(objective, "draw", spy_draw)
    mp.setattr(render.sampling, "denoiser", spy_denoiser)
    try:
        result = train(load_config(DEMO, overrides), root / "out")
    finally:
        mp.undo()
    return root, result, seen


@pytest.mark.slow
def test_trains_v_on_the_zero_terminal_snr_schedule(vpred_run):
    _, _, seen = vpred_run
    assert seen["draw"] == {("v_prediction", 0.0)}  # v targets; ᾱ_T = 0 exactly in training


@pytest.mark.slow
def test_previews_sample_with_the_v_denoiser(vpred_run):
    _, result, seen = vpred_run
    assert seen["denoiser"] == {"v_prediction"}
    assert len(list((result.output_dir / "samples").glob("*.png"))) == 1


def test_metadata_says_v_prediction_and_zero_terminal_snr(vpred_run):
    _, result, _ = vpred_run
    meta = read_lora(result.final)[1]
    assert meta["modelspec.prediction_type"] == "v"  # kohya's sai_model_spec PRED_TYPE_V
    assert meta["ss_v_parameterization"] == "True" and meta["ss_zero_terminal_snr"] == "True"


@pytest.mark.slow
def test_sample_and_grid_pick_the_prediction(vpred_run):
    root, result, _ = vpred_run
    from_keys = single.open_pipeline(str(root / "noob.safetensors"), [], device="cpu")
    from_lora = single.open_pipeline("tiny-sdxl", [result.final], device="cpu")  # a built-in base: the LoRA's metadata
    plain = single.open_pipeline("tiny-sdxl", [], device="cpu")
    forced = single.open_pipeline("tiny-sdxl", [result.final], device="cpu", prediction="epsilon")
    got = [(p.sd.cfg.prediction, p.sd.cfg.zero_terminal_snr) for p in (from_keys, from_lora, plain, forced)]
    assert got == [("v_prediction", True), ("v_prediction", True), ("epsilon", False), ("epsilon", False)]


@pytest.mark.slow
def test_v_sampling_differs_from_epsilon_sampling_of_the_same_weights(vpred_run):
    root, _, _ = vpred_run
    s = render.Settings("gssdemo, a red circle", steps=3, sampler="euler", seed=3, width=64, height=64)
    v = render.generate(render.load_pipeline(find_model(str(root / "noob.safetensors"))), s)
    eps = render.generate(render.load_pipeline(find_model(str(root / "noob.safetensors")), prediction="epsilon", zero_terminal_snr=False), s)
    assert torch.isfinite(v).all() and (v - eps).abs().max() > 1e-2
    with pytest.raises(RenderError, match="zero terminal SNR needs a v-prediction model"):
        render.load_pipeline(find_model(str(root / "noob.safetensors")), prediction="epsilon", zero_terminal_snr=True)
