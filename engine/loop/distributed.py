"""Data-parallel training over torch.distributed, in the processes `torchrun --nproc_per_node N -m gesso.cli train`
starts: NCCL between GPUs (one per process), gloo on the CPU.

Every rank holds the whole model and the same LoRA. An epoch's bucket-pure batch list is the same on every rank
(a pure function of the seed); batch j is trained by rank j % N (engine/data/dataset.py `shard`), so an optimizer
step of N x gradient_accumulation_steps consecutive batches gives each rank `accumulation` whole batches. Each
rank scales its loss by 1 / (N x accumulation) and the gradients are summed: the step is the single-process step
with accumulation N x accumulation over the same batches, and, because every rank also draws the noise of the
other ranks' batches (skipping it), the noise generator is that run's too. A state.pt is therefore the same on any
world size, and resumes on any other that keeps batch_size and N x accumulation.

Gradients are summed by one bucketed all-reduce of the LoRA gradients per optimizer step, not by DDP: the trained
parameters are spread over modules swapped into a frozen UNet and text encoders, which DDP would have to wrap
whole (hooks over the frozen model, buffers broadcast every forward, `no_sync` for accumulation), and a rank
with no batch in an epoch's short last step would have to run a dummy backward for DDP's hooks. LoRA gradients are a few MB to a few hundred: summing them
once after the backward costs little next to the step, and a rank with no batch simply sends zeros.

Only rank 0 writes: the run folder's lock, LoRA files, state.pt, logs, TensorBoard and previews. Rank 0 fills the
cache while the others wait, then they read it.
"""
import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, redirect_stdout
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from gesso.engine.config.sections import Config
from gesso.engine.data.dataset import shard
from gesso.engine.run import rundir
from gesso.engine.run.events import Events, StopTraining
from gesso.errors import GessoError, TrainError

# rank 0 alone caches the dataset and renders previews while the others wait in a collective: more than the
# defaults (10 minutes for NCCL) for a large dataset; a rank that fails ends the others through torchrun at once
TIMEOUT = timedelta(minutes=60)
BUCKET_BYTES = 25 * 2**20  # gradients summed per all-reduce, as DDP buckets them


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: rank `rank` of `size`, GPU `local_rank` of its host."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """`device` for this rank: its own GPU under torchrun."""
        if device.type == "cuda" and self.size > 1:
            return torch.device("cuda", self.local_rank)
        return device

    @contextmanager
    def claim(self, folder: Path, cfg: Config, mode: str) -> Iterator[rundir.Claim]:
        """rundir.claim by rank 0, its refusal raised on every rank: a run folder is locked and checked once. The
        other ranks, which write nothing, hold a claim that keeps no files and has nothing to prove."""
        if self.size == 1:
            with rundir.claim(folder, cfg, mode) as held:
                yield held
            return
        with ExitStack() as stack:
            refusal, held = None, rundir.Claim(folder, cfg)
            if self.main:
                try:
                    held = stack.enter_context(rundir.claim(folder, cfg, mode))
                except GessoError as e:
                    refusal = e
            message = [str(refusal) if refusal else None]
            dist.broadcast_object_list(message, src=0)
            if refusal:
                raise refusal
            if message[0] is not None:
                raise TrainError(message[0])
            yield held

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (filling the cache), the others after it (reading the files it wrote)."""
        if self.size > 1 and not self.main:
            dist.barrier()
        yield
        if self.size > 1 and self.main:
            dist.barrier()

    def batches(self, cache, epoch: int, batch_size: int, seed: int, skip: int) -> Iterator:
        """The epoch's batches from batch `skip` on: this rank's as the cache's tensors on the device, another
        rank's as its latents' shape (B, C, h, w), for the noise draws that keep this rank's generator in step."""
        batches = cache.dataset.epoch(epoch, batch_size, seed)
        for samples, mine in zip(batches[skip:], shard(batches, self.rank, self.size)[skip:]):
            yield (*cache.tensors(mine), *cache.weighting(mine)) if mine is not None else torch.Size([len(samples), *cache.latents[samples[0].index].shape])

    def broadcast_parameters(self, network) -> None:
        """Rank 0's LoRA weights on every rank: the same seed gives the same init, this makes sure of it."""
        if self.size > 1:
            for p in network.parameters():
                dist.broadcast(p.data, src=0)

    def reduce(self, network, losses: list[float]) -> float:
        """After a step's backward passes: every rank's LoRA gradients summed in place (each rank scaled its losses
        by 1 / micro-batches per step, so the sum is the single-process gradient), and the mean loss over the
        step's micro-batches on every rank. A sync point: every rank calls it once per optimizer step."""
        if self.size == 1:
            return sum(losses) / len(losses)
        params = list(network.parameters())
        for p in params:
            if p.grad is None:  # this rank had no batch in the epoch's last step: it sends zeros
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(params):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            dist.all_reduce(flat)
            for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad.copy_(g.view_as(p.grad))
        totals = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=params[0].device)
        dist.all_reduce(totals)
        return (totals[0] / totals[1]).item()

    def emit_step(self, events: Events, event: dict) -> None:
        """The step event, and a stop (StopTraining from the callback: a signal reached this rank) taken on every
        rank at the same step: ranks stopping at different steps would leave one waiting in the next all-reduce."""
        stop = False
        try:
            events.emit(event)
        except StopTraining:
            stop = True
        if self.size > 1:
            flag = torch.tensor([float(stop)], device=_collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            raise StopTraining


def _buckets(params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket, size = [], 0
    for p in params:
        bucket.append(p)
        size += p.numel() * p.element_size()
        if size >= BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


SINGLE = World()


class NoLog:
    """The run log of a rank that writes nothing: rank 0's metrics.jsonl already holds every step's all-reduced loss."""

    def open(self) -> None:
        pass

    def step(self, record: dict, steps_per_s: float, peak_memory_gib: float | None) -> None:
        pass

    def validation(self, step: int, epoch: int, val_loss: float) -> None:
        pass

    def close(self) -> None:
        pass


def from_environment(env: Mapping[str, str]) -> World:
    """The world torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK; one process when they are absent."""
    if "WORLD_SIZE" not in env:
        return SINGLE
    try:
        world = World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
    except (KeyError, ValueError):
        raise TrainError(f"WORLD_SIZE={env['WORLD_SIZE']!r} set without a valid RANK and LOCAL_RANK: "
                         "start several processes with torchrun --nproc_per_node N -m gesso.cli train ...") from None
    if not 0 <= world.rank < world.size:
        raise TrainError(f"RANK={world.rank} is not within WORLD_SIZE={world.size}")
    return world


@contextmanager
def joined(world: World, device: str) -> Iterator[None]:
    """The process group of a torchrun launch (MASTER_ADDR/MASTER_PORT from torchrun, env://) for the block:
    NCCL when training on CUDA (`device`: train.device), gloo on the CPU. The other ranks' stdout is silenced
    (their prints would repeat rank 0's); their errors still reach stderr."""
    if world.size == 1:
        yield
        return
    cuda = device == "cuda" or device == "auto" and torch.cuda.is_available()
    if cuda:
        if torch.cuda.device_count() <= world.local_rank:
            raise TrainError(f"LOCAL_RANK={world.local_rank}, but this host has {torch.cuda.device_count()} CUDA device(s): "
                             "start at most that many processes per node")
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=world.rank, world_size=world.size,
                            timeout=TIMEOUT)
    with ExitStack() as stack:
        if not world.main:
            stack.enter_context(redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        try:
            yield
        finally:
            dist.destroy_process_group()
