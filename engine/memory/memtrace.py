"""Predict a LoRA training step's peak GPU memory on any machine, in seconds, before loading a weight.

The step `gesso train` would run (the config's model, network, precision, fp8 bases, checkpointing,
optimizer, batch and resolution) runs on the meta device: shapes and dtypes, no data and no
arithmetic. A dispatch mode counts the bytes of every tensor storage from its allocation until it is
freed: the LoRA gradients and what autograd keeps between forward and backward, recomputation
included. The frozen weights, the LoRA parameters and the optimizer's states (from one step, outside
the count) are added: the peak is that of every step after the first. Attention runs as aten's flash-attention op, which is what
SDPA picks on a GPU for these shapes and saves what the Triton kernel saves (q, k, v, o and the row
log-sum-exp); on the meta device SDPA would decompose into the math path and hold every score matrix.

With block swap (engine/memory/blockswap.py) only the resident weights count as weights; the swapped units' copies
on the device are allocations inside the step, counted as they live, and reported as the swap buffers.

What it does not see: the CUDA context (a few hundred MB, outside torch's allocator), cuBLAS and
kernel workspaces, and the caching allocator's rounding and fragmentation. Compare the prediction with
torch.cuda.max_memory_allocated, not with nvidia-smi. The encoders are not counted: `gesso train` moves
them off the GPU once the latents and captions are cached.
"""
import dataclasses
import weakref
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from gesso import models
from gesso.engine.config.sections import Config
from gesso.engine.lora import names
from gesso.engine.memory.network_setup import AMP_DTYPES, prepare_unet, train_optimizer
from gesso.errors import ConfigError

GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages allocated inside the mode and still alive: `current`, and its `peak`.

    A storage counts from the op that first returns it until its last tensor is freed (a weak
    reference's finaliser). Outputs that share a storage with an input (views, in-place ops) allocate
    nothing. Storages made before the mode (the weights) are not counted here: the caller adds them.
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # StorageImpl address -> bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = set()
        tree_map_only(torch.Tensor, lambda t: inputs.add(t.untyped_storage()._cdata), (args, kwargs))
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, lambda t: self._allocated(t, inputs), out)
        return out

    def _allocated(self, t: torch.Tensor, inputs: set) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in inputs or key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        size = self._live.pop(key, None)
        if size is not None:
            self.current -= size


@dataclass(frozen=True)
class MemoryPrediction:
    model: str
    resolution: int
    batch: int
    rank: int
    precision: str  # the frozen UNet's: bf16, fp16, fp32, or fp8 (bases) + bf16
    gradient_checkpointing: bool
    blocks_to_swap: int
    optimizer: str
    weights_gib: float  # the frozen UNet as stored on the device (swapped blocks' weights are in host memory)
    trainable_gib: float  # the LoRA parameters (fp32) and their gradients
    optimizer_gib: float  # the optimizer's states
    swap_gib: float  # the most swapped-in block weights alive at once (0 without block swap)
    activations_gib: float  # the rest of the peak: saved activations, recomputation, temporaries
    peak_gib: float  # everything live at the step's worst moment: compare with torch.cuda.max_memory_allocated

    @property
    def mode(self) -> str:
        return (f"{self.precision}{' + checkpointing' if self.gradient_checkpointing else ''}"
                f"{f' + swap {self.blocks_to_swap} blocks' if self.blocks_to_swap else ''}")

    def describe(self) -> str:
        swap = f" + swap buffers {self.swap_gib:.2f}" if self.blocks_to_swap else ""
        return (f"{self.model} {self.resolution}px batch {self.batch} rank {self.rank}, {self.mode}, {self.optimizer}: "
                f"peak {self.peak_gib:.2f} GiB = weights {self.weights_gib:.2f} + LoRA and grads {self.trainable_gib:.2f} "
                f"+ optimizer {self.optimizer_gib:.2f}{swap} + activations {self.activations_gib:.2f}")


def _flash_sdpa(q, k, v, *args, **kwargs):
    """SDPA as a GPU runs it for bf16/fp16 heads up to 256 wide: flash attention, scores never stored."""
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]


def model_config(cfg: Config):
    return models.find_model(*cfg.model.source).config  # headers only


def _nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage()._cdata: t for t in tensors}.values())


def _optimizer_step(opt, name: str, params: list) -> None:
    if name != "prodigy":
        opt.step()
        return
    # Prodigy's step reads its running sums back to the host (d), which has no meaning on meta tensors;
    # its states are four fp32 tensors shaped like each parameter (p0, s, exp_avg, exp_avg_sq).
    for p in params:
        opt.state[p] = {k: torch.zeros_like(p) for k in ("p0", "s", "exp_avg", "exp_avg_sq")}


def predict(cfg: Config, resolution: int | None = None, batch: int | None = None) -> MemoryPrediction:
    """The peak GPU memory of `cfg`'s UNet LoRA training step (text-encoder LoRA not included)."""
    mcfg = model_config(cfg)
    tc = cfg.train
    if tc.mixed_precision == "auto":  # what a GPU from sm_80 trains in (the CPU's fp32 has no GPU memory to predict)
        tc = dataclasses.replace(tc, mixed_precision="bf16")
    resolution = resolution or cfg.dataset.resolution
    batch = batch or tc.batch_size
    if cfg.network.type == "embedding":
        raise ConfigError("network.type = embedding: the memory prediction (gesso memory, train.memory = auto) covers "
                          "LoRA and LyCORIS networks; set the memory keys by hand")
    unet = names.meta_unet(mcfg.unet).requires_grad_(False)
    unet.to(AMP_DTYPES.get(tc.mixed_precision, torch.float32))  # as train loads it, before injection
    network, swap = prepare_unet(unet, cfg, torch.device("meta"))
    trainable = list(network.parameters())
    ids = {id(p) for p in trainable}
    frozen = [t for t in (*unet.parameters(), *unet.buffers()) if id(t) not in ids]  # swapped ones are None: not here
    opt = train_optimizer(network, tc, cfg.network)
    h = resolution // 8
    with LiveBytes() as live, mock.patch.object(F, "scaled_dot_product_attention", _flash_sdpa):
        x0 = torch.empty(batch, mcfg.unet.in_channels, h, h, device="meta")  # cached latents, fp32
        noise = torch.empty_like(x0)
        t = torch.empty(batch, dtype=torch.long, device="meta")
        context = torch.empty(batch, 77, mcfg.unet.context_dim, device="meta")
        y = None if mcfg.unet.adm_in_channels is None else torch.empty(batch, mcfg.unet.adm_in_channels, device="meta")
        pred = unet(x0 + noise, t, context, y)
        F.mse_loss(pred.float(), noise).backward()
        del x0, noise, t, context, y, pred
    # The optimizer's step runs outside the count, for its states only: every later step is this one with
    # the states alive (the gradients are freed by zero_grad), and its own temporaries are one tensor's.
    _optimizer_step(opt, tc.optimizer, trainable)
    opt.zero_grad(set_to_none=True)
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    weights, params = _nbytes(frozen), _nbytes(trainable)
    optimizer = _nbytes(states)
    peak = weights + params + optimizer + live.peak  # the gradients and swap copies are in live.peak: made in the step
    with_grads = 2 * params  # the gradients are as large as the parameters (fp32)
    swapped = swap.peak_bytes if swap else 0
    precision = f"fp8 bases + {tc.mixed_precision}" if tc.fp8_base else {"no": "fp32"}.get(tc.mixed_precision, tc.mixed_precision)
    return MemoryPrediction(
        mcfg.name, resolution, batch, cfg.network.rank, precision, tc.gradient_checkpointing, tc.blocks_to_swap,
        tc.optimizer, weights / GIB, with_grads / GIB, optimizer / GIB, swapped / GIB,
        (peak - weights - with_grads - optimizer - swapped) / GIB, peak / GIB)


def unit_count(cfg: Config) -> int:
    """Blocks of `cfg`'s UNet that block swap can move (res-blocks and transformer blocks; SDXL: 87)."""
    return len(names.meta_unet(model_config(cfg).unet).units())


def with_mode(cfg: Config, fp8_base: bool, checkpointing: bool, blocks_to_swap: int = 0) -> Config:
    half = "fp16" if cfg.train.mixed_precision == "fp16" else "bf16"
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, mixed_precision=half, fp8_base=fp8_base, gradient_checkpointing=checkpointing,
        blocks_to_swap=blocks_to_swap, memory="manual"))


def memory_modes(cfg: Config) -> list[MemoryPrediction]:
    """`cfg`'s step in each memory mode: bf16 (or the config's fp16) bases or fp8 bases, each without and with
    gradient checkpointing, then with checkpointing and every block swapped; everything else (model, network,
    optimizer, batch, resolution) as configured."""
    every = unit_count(cfg)
    modes = [(fp8_base, checkpointing, 0) for fp8_base in (False, True) for checkpointing in (False, True)]
    return [predict(with_mode(cfg, *m)) for m in modes + [(False, True, every), (True, True, every)]]
