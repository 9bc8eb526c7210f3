"""Gesso: fast LoRA training for Stable Diffusion XL and SD 1.5, with Triton kernels."""
