"""Shared test setup.

Triton kernels run on the CPU through Triton's interpreter, which reads TRITON_INTERPRET only when
triton.language is first imported: set it here, before any test module imports the project.
"""
import os
import sys

import torch

if not torch.cuda.is_available() and "triton.language" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
