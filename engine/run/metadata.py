"""The `ss_*` and `modelspec.*` metadata that kohya's scripts write and the consumers read, as a run records it
in every file it saves. It reads the config and the dataset, so it lives with the run: engine/lora/ knows neither.

AUTOMATIC1111 lists a LoRA under SDXL only when `ss_base_model_version` starts with `sdxl_`, and parses
values that start with `{` as JSON, so JSON-valued keys are always valid JSON strings. `cfg` is the resolved
config (engine/loop/prediction.py), so the prediction keys say what was trained.
"""
import json
import time
from collections import Counter

from gesso.engine.config.sections import Config
from gesso.engine.data.dataset import Dataset, Item
from gesso.engine.lora import lycoris
from gesso.engine.lora.formats import BASE_MODEL_VERSION, MODELSPEC_ARCHITECTURE

MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v"}  # kohya's sai_model_spec PRED_TYPE_EPSILON, PRED_TYPE_V


def tag_frequency(items: list[Item]) -> dict[str, dict[str, int]]:
    """{folder name: {tag: count}} over comma-separated caption tags, as kohya records it."""
    out: dict[str, Counter] = {}
    for it in items:
        tags = [t.strip() for t in it.caption.split(",") if t.strip()]
        out.setdefault(it.path.parent.name, Counter()).update(tags)
    return {folder: dict(counts) for folder, counts in out.items()}


def training_metadata(cfg: Config, family: str, dataset: Dataset, started_at: float) -> dict[str, str]:
    """Everything known before the first step; epoch, steps and finish time are added at each save."""
    res = cfg.dataset.resolution
    items = dataset.items
    buckets = sorted({it.bucket for it in items})
    n = cfg.network
    if n.type == "lora":
        module, args = "networks.lora", {"conv_dim": str(n.conv_rank), "conv_alpha": str(n.conv_alpha)} if n.conv_rank else {}
    else:
        module, args = "lycoris.kohya", lycoris.network_args(n.type, lycoris.Options.of(n), n.conv_rank, n.conv_alpha)
    # kohya's network_args are strings as its command line parsed them; network_dropout has its own key ("None": off)
    args |= {key: str(getattr(n, key)) for key in ("rank_dropout", "module_dropout", "loraplus_lr_ratio",
                                                    "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio") if getattr(n, key)}
    meta = {
        "ss_network_module": module,
        "ss_network_dim": n.rank,
        "ss_network_alpha": n.alpha,
        "ss_network_args": json.dumps(args),
        "ss_network_dropout": n.dropout or None,
        "ss_loraplus_lr_ratio": n.loraplus_lr_ratio or None,
        "ss_loraplus_unet_lr_ratio": n.loraplus_unet_lr_ratio or None,
        "ss_loraplus_text_encoder_lr_ratio": n.loraplus_text_encoder_lr_ratio or None,
        "ss_ema_decay": cfg.train.ema_decay or None,
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_v2": family == "sd2",
        "ss_sd_model_name": cfg.model.checkpoint or cfg.model.name,
        "ss_resolution": f"({res}, {res})",
        "ss_num_epochs": cfg.train.epochs,
        "ss_batch_size_per_device": cfg.train.batch_size,
        "ss_learning_rate": cfg.train.learning_rate,
        "ss_unet_lr": cfg.train.learning_rate,
        "ss_text_encoder_lr": (cfg.train.text_encoder_lr or cfg.train.learning_rate) if cfg.network.train_text_encoders else 0.0,
        "ss_network_train_unet_only": not cfg.network.train_text_encoders,
        "ss_optimizer": cfg.train.optimizer + (f"({json.dumps(cfg.train.optimizer_args)})" if cfg.train.optimizer_args else ""),
        "ss_lr_scheduler": cfg.train.lr_scheduler,
        "ss_mixed_precision": cfg.train.mixed_precision,
        "ss_seed": cfg.train.seed,
        "ss_num_train_images": len(dataset),
        "ss_tag_frequency": json.dumps(tag_frequency(items)),
        "ss_dataset_dirs": json.dumps(dataset.folders()),
        "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": [w, h], "count": sum(it.bucket == (h, w) for it in items)}
                                                  for i, (h, w) in enumerate(buckets)}}),
        "ss_enable_bucket": cfg.dataset.bucketing,
        "ss_flip_aug": cfg.dataset.flip,
        "ss_shuffle_caption": cfg.dataset.shuffle_caption,
        "ss_keep_tokens": cfg.dataset.keep_tokens,
        "ss_caption_dropout_rate": cfg.dataset.caption_dropout_rate,
        "ss_gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "ss_max_grad_norm": cfg.train.max_grad_norm,
        "ss_gradient_checkpointing": cfg.train.gradient_checkpointing,
        "ss_lr_warmup_steps": cfg.train.lr_warmup_steps,
        "ss_min_snr_gamma": cfg.loss.min_snr_gamma,
        "ss_noise_offset": cfg.loss.noise_offset,
        "ss_multires_noise_iterations": cfg.loss.multires_noise_iterations,
        "ss_multires_noise_discount": cfg.loss.multires_noise_discount,
        "ss_loss_type": cfg.loss.loss_type,
        # kohya writes ss_zero_terminal_snr; ss_v_parameterization is what model-info tools read for v-prediction
        "ss_v_parameterization": cfg.loss.prediction == "v_prediction",
        "ss_zero_terminal_snr": cfg.loss.zero_terminal_snr,
        "ss_output_name": cfg.output.name,
        "ss_training_started_at": started_at,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[family],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers",
        "modelspec.title": cfg.output.name,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": MODELSPEC_PREDICTION[cfg.loss.prediction],
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started_at)),
        "modelspec.trigger_phrase": cfg.dataset.trigger,
    }
    return {k: str(v) for k, v in meta.items()}


def at_save(meta: dict[str, str], epoch: int, step: int) -> dict[str, str]:
    return {**meta, "ss_epoch": str(epoch), "ss_steps": str(step), "ss_training_finished_at": str(time.time())}
