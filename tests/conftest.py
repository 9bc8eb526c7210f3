"""Shared test setup.

Triton kernels run on the CPU through Triton's interpreter, which reads TRITON_INTERPRET only when
triton.language is first imported: set it here, before any test module imports the project.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton.language" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The test models are tiny: one intra-op thread, which cannot stall in OpenMP waits when other processes
    share the cores (measured on a busy 2-core machine: 14 s per tiny-UNet forward with 2 threads, 0.1 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
