"""Benchmarks: Triton kernels vs their PyTorch baselines at SDXL 1024x1024 shapes on a GPU;
on a CPU, the references alone at small shapes, as a smoke test whose numbers are CPU numbers."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
