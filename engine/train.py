"""The training loop: cache the dataset, inject LoRA into the UNet, AdamW on epsilon-prediction MSE."""
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import models
from engine import data, diffusion, lora
from engine.cache import EncodedDataset, encode_dataset
from engine.config import Config
from engine.lora_file import save_lora
from engine.metadata import at_save, training_metadata

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class TrainError(Exception):
    """A problem with the run's inputs (empty dataset, unknown model); one line naming it."""


@dataclass
class TrainResult:
    output_dir: Path
    final: Path
    epoch_files: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


@dataclass
class Plan:
    images: int
    repeats: int
    batch_size: int
    epochs: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.images * self.repeats / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def describe(self) -> str:
        return (f"{self.images} images x {self.repeats} repeats / batch {self.batch_size} = {self.steps_per_epoch} steps per epoch"
                f" x {self.epochs} epochs = {self.total_steps} steps")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device = cuda, but no CUDA device is available")
    return torch.device(name)


def load_model(cfg: Config, device: torch.device):
    """The base model: a built-in architecture at random init from `model.seed`."""
    try:
        model_cfg = models.configs.get(cfg.model.name)
    except KeyError as e:
        raise TrainError(f"model.name: {e.args[0]}") from None
    return models.build(model_cfg, seed=cfg.model.seed, device=device), model_cfg


def prepare_run(cfg: Config, device: torch.device):
    """Model with LoRA injected, the encoded dataset and the dataset items."""
    items = data.scan(cfg.dataset.path, cfg.dataset.caption_extension, cfg.dataset.trigger)
    if not items:
        raise TrainError(f"dataset.path: no images (png, jpg, webp) in {cfg.dataset.path}")
    sd, model_cfg = load_model(cfg, device)
    sd.requires_grad_(False)
    sd.eval()
    tokenizers = models.load_tokenizers(model_cfg)
    encoded = encode_dataset(sd, tokenizers, items, cfg.dataset.resolution, device)
    network = lora.inject(sd.unet, lora.attention_targets(sd.unet), "lora_unet_", cfg.network.rank, cfg.network.alpha)
    return sd, model_cfg, network, encoded, items


@torch.no_grad()
def fixed_eval_loss(unet, encoded: EncodedDataset, seed: int = 1234, draws: int = 4) -> float:
    """Mean epsilon loss over every cached image at fixed timesteps and noise: comparable before and after."""
    g = torch.Generator().manual_seed(seed)
    ac = diffusion.scaled_linear_alphas_cumprod()
    device = next(unet.parameters()).device
    total = 0.0
    for _ in range(draws):
        index = torch.arange(len(encoded))
        x0, context, y = encoded.batch(index, device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, len(ac), (len(index),), generator=g).to(device)
        total += diffusion.epsilon_loss(unet(diffusion.add_noise(x0, noise, t, ac), t, context, y), noise).item()
    return total / draws


def train(cfg: Config, output_dir: str | Path, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train a LoRA as `cfg` says and write its files to `output_dir`; `on_step` receives each step's metrics."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    started_at = time.time()
    sd, model_cfg, network, encoded, items = prepare_run(cfg, device)
    unet = sd.unet
    meta = training_metadata(cfg, model_cfg.family, items, started_at)
    plan = Plan(len(items), cfg.dataset.repeats, cfg.train.batch_size, cfg.train.epochs)
    print(plan.describe(), flush=True)

    params = network.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    ac = diffusion.scaled_linear_alphas_cumprod()
    g = torch.Generator().manual_seed(cfg.train.seed)  # CPU generator: the same draws on any device
    save_dtype = SAVE_DTYPES[cfg.output.save_dtype]
    result = TrainResult(output_dir, output_dir / f"{cfg.output.name}.safetensors")
    step = 0
    with open(output_dir / "metrics.jsonl", "w") as log, tqdm(total=plan.total_steps, unit="step", dynamic_ncols=True) as bar:
        for epoch in range(1, plan.epochs + 1):
            order = torch.randperm(plan.images * plan.repeats, generator=g) % plan.images
            for index in order.split(plan.batch_size):
                x0, context, y = encoded.batch(index, device)
                noise = torch.randn(x0.shape, generator=g).to(device)
                t = torch.randint(0, len(ac), (len(index),), generator=g).to(device)
                loss = diffusion.epsilon_loss(unet(diffusion.add_noise(x0, noise, t, ac), t, context, y), noise)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                record = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": opt.param_groups[0]["lr"]}  # .item() syncs
                log.write(json.dumps(record) + "\n")
                log.flush()
                result.losses.append(record["loss"])
                bar.set_postfix(loss=f"{record['loss']:.4f}", epoch=epoch)
                bar.update()
                if on_step:
                    on_step(record)
            if epoch % cfg.output.save_every_n_epochs == 0:
                path = output_dir / f"{cfg.output.name}-{epoch:06d}.safetensors"
                save_lora(path, network.kohya_state_dict(save_dtype), at_save(meta, epoch, step))
                result.epoch_files.append(path)
    save_lora(result.final, network.kohya_state_dict(save_dtype), at_save(meta, plan.epochs, step))
    return result
