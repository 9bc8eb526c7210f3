"""tests/formats reuse tests/models' reference helpers (diffusers' single-file converters).

The tiny models' ops are microseconds long: one intra-op thread is faster than two, and on a shared, loaded
machine OpenMP's spinning barriers made two threads 100x slower (measured: one tiny SD 1.5 UNet call 0.06 s on
one thread, 15 s on two under a load average of 6).
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
