"""The input errors the CLI reports as one line and exit code 2, never as a traceback."""
from models.loaders import CheckpointError
from engine.config import ConfigError
from engine.lora_file import LoRAFileError
from engine.prompt import PromptError
from engine.render import RenderError
from engine.train import TrainError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, CheckpointError, LoRAFileError, PromptError, RenderError, TrainError)
