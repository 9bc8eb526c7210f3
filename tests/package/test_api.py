"""The README's Python API section is the public API as it is: every exported error has its own line saying when it
is raised, and the signatures it shows are the functions' own, names and defaults."""
import ast
import inspect
import re
from pathlib import Path

import pytest

import gesso

ROOT = Path(__file__).resolve().parents[2]


def api_section() -> str:
    return (ROOT / "README.md").read_text().split("### Python API", 1)[1].split("\n## ", 1)[0]


def test_every_exported_error_is_documented_on_a_line_of_its_own():
    errors = {name for name in gesso.__all__ if isinstance(getattr(gesso, name), type)
              and issubclass(getattr(gesso, name), gesso.GessoError) and name != "GessoError"}
    documented = set(re.findall(r"^  - `(\w+)`: \w", api_section(), re.M))
    assert errors == documented, f"exported but undocumented: {sorted(errors - documented)}; " \
                                 f"documented but not exported: {sorted(documented - errors)}"


def shown_signature(name: str) -> list[tuple[str, object]]:
    """(parameter, default or inspect.Parameter.empty) as the README writes `gesso.<name>(...)`."""
    text = re.search(rf"`gesso\.{name}\((.*?)\)`", api_section(), re.S).group(1)
    params = []
    for part in re.split(r",\s*", " ".join(text.split())):
        key, eq, default = part.partition("=")
        params.append((key, ast.literal_eval(default) if eq else inspect.Parameter.empty))
    return params


@pytest.mark.parametrize("name", ["train", "load_config", "build_config", "sample"])
def test_the_readme_shows_each_signature_as_it_is(name):
    actual = [(p.name, p.default) for p in inspect.signature(getattr(gesso, name)).parameters.values()]
    assert shown_signature(name) == actual
