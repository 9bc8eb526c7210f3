"""The errors Gesso raises for bad input: one line naming the file, key or part, never a traceback.

They live here, below every other module, so that `models/` and `engine/` raise them without importing
each other and a host catches every one of them with `except gesso.GessoError`. The CLI prints their
message after `error: ` and exits 2.
"""


class GessoError(Exception):
    """Bad input to Gesso: a config, a file, a prompt or a run that cannot be used as given."""


class ConfigError(GessoError):
    """A bad config key or value; the message is one line naming the file and key."""


class CheckpointError(GessoError):
    """A model that cannot be found or read: an unknown built-in name, a missing path or uncached Hub id, a file that
    is not a readable checkpoint of a supported model. One line naming the key or option and the source
    (models/lookup.py, models/loaders.py)."""


class LoRAFileError(GessoError):
    """A LoRA file that cannot be read or placed; the message names the file or key."""


class PromptError(GessoError, ValueError):
    """A prompt that cannot be read; the message names the part."""


class RenderError(GessoError):
    """A render request that cannot be carried out (bad size, unknown model, missing LoRA); one line."""


class TrainError(GessoError):
    """A problem with the run's inputs (empty dataset, unknown model, bad resume); one line naming it."""


class OutputError(GessoError):
    """A file that cannot be written (full disk, read-only folder, a path that is a file); the message names the path
    and what to do. Earlier files are left as they were."""
