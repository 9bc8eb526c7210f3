"""A training step whose forward and backward replay as one captured CUDA graph (the `graph` switch of the
GPU session's step benchmark).

At batch 1 an SDXL step launches thousands of small kernels (norms, adds, the 722 LoRA linears and their
backward), and the GPU can idle between launches while the host catches up. Capturing forward and backward
once and replaying the graph removes that host time. The optimizer step stays eager: AdamW8bit's bias
correction is a host number that changes every step, which a replayed graph would freeze. Following
PyTorch's whole-network capture recipe, the model runs a few eager steps on a side stream first (Triton's
autotuning and the allocator's warm-up happen there), the gradients are set to None before capture so the
graph allocates them in its own pool, and each replay rewrites them in place for the optimizer to read.
Every replay reads the captured input tensors: the step benchmark trains on one batch, as `bench` does;
a training loop would copy each new batch into them.
"""
from collections.abc import Callable

import torch


class GraphedStep:
    """`step()` = replay forward + backward, then `opt.step()`; `loss_fn()` must only read its captured tensors."""

    def __init__(self, loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("a CUDA graph needs a CUDA GPU; this machine has none")
        self.opt = opt
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                loss_fn().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(side)
        opt.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients in its pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = loss_fn()
            self.loss.backward()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        self.opt.step()  # reads the gradients the replay rewrote; no zero_grad: the next replay overwrites them
        return self.loss.detach()

