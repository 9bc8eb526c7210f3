"""Measuring a training step's speed, shared by `gesso bench` and `benchmarks/`: the step benchmark, its diffusers peer, CUDA graphs and the device harness."""
