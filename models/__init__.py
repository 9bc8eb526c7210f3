"""Model code and loading: SDXL / SD 1.x / SD 2.x modules named like the original single-file checkpoints."""
from models import configs
from models.loaders import CheckpointError, load_model, open_checkpoint
from models.sd import StableDiffusion, build
from models.tokenizer import load_tokenizers, tokenize

__all__ = ["build", "configs", "StableDiffusion", "load_tokenizers", "tokenize", "load_model", "open_checkpoint",
           "CheckpointError"]
