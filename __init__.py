"""Gesso: fast LoRA training for Stable Diffusion XL and SD 1.5, with Triton kernels.

The public API is the short list below; everything else is the engine's inside and may change.

    import gesso

    cfg = gesso.load_config("my.toml", ["train.epochs=4"])   # or gesso.build_config({...})
    result = gesso.train(cfg, "output/mystyle", on_event=print, progress=False)

See the README's "Python API" section for a complete example (events, stopping, resuming, gesso.Control).
"""
from gesso.engine.config.load import build_config, load_config
from gesso.engine.config.sections import Config
from gesso.engine.loop.control import Control
from gesso.engine.loop.train import TrainResult, train
from gesso.engine.lora.files import read_lora
from gesso.engine.lora.tools import convert_lora, merge_lora, resize_lora
from gesso.engine.run.events import StopTraining
from gesso.engine.sampling.sample import sample
from gesso.errors import (CheckpointError, ConfigError, GessoError, LoRAFileError, OutputError, PromptError, RenderError,
                          TrainError)

__version__ = "0.1.0"

__all__ = [
    "Config", "build_config", "load_config", "train", "TrainResult", "StopTraining", "Control",
    "read_lora", "convert_lora", "merge_lora", "resize_lora", "sample",
    "GessoError", "ConfigError", "CheckpointError", "LoRAFileError", "OutputError", "PromptError", "RenderError", "TrainError",
]
