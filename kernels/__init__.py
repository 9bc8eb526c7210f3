"""Triton kernels for LoRA training, each beside the PyTorch reference that defines it."""
