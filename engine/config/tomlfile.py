"""The one TOML reader of configs and kohya dataset configs: a missing, undecodable or invalid file is one ConfigError
line naming it, never a traceback."""
import tomllib
from pathlib import Path

from gesso.errors import ConfigError


def read_toml(path: str | Path, what: str = "config file") -> dict:
    """The parsed TOML at `path`; `what` names the file in the error (e.g. "dataset config file")."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a {what}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
