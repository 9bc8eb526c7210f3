"""The LoRA file tests reuse tests/models' reference helpers (diffusers' single-file converters)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models"))


