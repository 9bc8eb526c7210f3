"""Model code and loading: SDXL / SD 1.x / SD 2.x modules named like the original single-file checkpoints."""
from gesso.models import configs
from gesso.models.loaders import CheckpointError, load_model, open_checkpoint
from gesso.models.lookup import Model, find_model, recorded_model
from gesso.models.sd import StableDiffusion, build
from gesso.models.tokenizer import load_tokenizers, tokenize

__all__ = ["build", "configs", "StableDiffusion", "load_tokenizers", "tokenize", "load_model", "open_checkpoint",
           "CheckpointError", "Model", "find_model", "recorded_model"]
