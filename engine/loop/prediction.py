"""What a run trains and previews: ε- or v-prediction, on the plain or the zero-terminal-SNR schedule.

The model's own parameterisation comes from the checkpoint (models/detect.py: the `v_pred` and `ztsnr` marker keys
ComfyUI reads, or a diffusers folder's scheduler config); `model.prediction` overrides it, and `loss.prediction`, the
key's older name, still does. One resolved answer then feeds the loss target, the noise schedule, the LoRA metadata
and the samplers, so a v-prediction LoRA is previewed as it is trained.
"""
from dataclasses import replace

from gesso.engine.config.sections import Config
from gesso.errors import TrainError
from gesso.models.configs import ModelConfig


def resolve(cfg: Config, model_cfg: ModelConfig) -> tuple[Config, ModelConfig]:
    """The config with loss.prediction and loss.zero_terminal_snr set to what is trained, and the model config
    saying the same (the samplers read it); a ztsnr checkpoint turns zero terminal SNR on by itself."""
    asked = cfg.model.prediction if cfg.model.prediction != "auto" else cfg.loss.prediction
    prediction = model_cfg.prediction if asked == "auto" else asked
    ztsnr = cfg.loss.zero_terminal_snr or model_cfg.zero_terminal_snr
    if prediction == "epsilon" and ztsnr:
        # at ᾱ_T = 0 the input is pure noise, so an ε-model's x0 = (x_T - ε̂) / 0 is undefined (Lin et al. 2024, sec. 3.2)
        raise TrainError("loss.zero_terminal_snr needs v-prediction (model.prediction = \"v_prediction\")")
    if prediction == "epsilon" and cfg.loss.scale_v_pred_loss_like_noise_pred:
        raise TrainError("loss.scale_v_pred_loss_like_noise_pred applies to v-prediction only (model.prediction = \"v_prediction\")")
    loss = replace(cfg.loss, prediction=prediction, zero_terminal_snr=ztsnr)
    model = replace(cfg.model, prediction=prediction)
    return replace(cfg, model=model, loss=loss), replace(model_cfg, prediction=prediction, zero_terminal_snr=ztsnr)
