"""The README's config reference lists every config key, and the CLI points to it."""
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from gesso.engine.config.sections import Config

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_lists_every_key():
    text = (ROOT / "README.md").read_text()
    for section in fields(Config):
        block = text.split(f"### `[{section.name}]`", 1)[1].split("\n### ", 1)[0]
        rows = re.findall(r"^\| `(\w+)`(?: / `(\w+)`)?(?: / `(\w+)`)?", block, flags=re.M)  # a row may name 2-3 keys
        documented = {key for row in rows for key in row if key}
        keys = {f.name for f in fields(section.default_factory)}
        assert keys <= documented, f"[{section.name}] keys missing from README: {sorted(keys - documented)}"


@pytest.mark.slow
def test_train_help_points_to_the_reference():
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", "--help"], capture_output=True, text=True).stdout
    assert "README.md" in out and "Config reference" in out
