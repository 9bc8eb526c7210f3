"""Encode the dataset once: VAE latents per image, text-encoder outputs and the ADM vector per caption.

After this the VAE and text encoders are not needed by the training step, which sees only these tensors.
"""
from dataclasses import dataclass

import torch

import models
from engine.data import Item, prepare


@dataclass
class EncodedDataset:
    latents: torch.Tensor  # (N, 4, H/8, W/8)
    context: torch.Tensor  # (N, 77*k, context_dim)
    y: torch.Tensor | None  # (N, adm) for SDXL, None for SD 1.x

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        y = None if self.y is None else self.y[index].to(device)
        return self.latents[index].to(device), self.context[index].to(device), y


@torch.no_grad()
def encode_dataset(sd, tokenizers, items: list[Item], resolution: int, device: torch.device, batch_size: int = 4) -> EncodedDataset:
    """Latents, contexts and (SDXL) ADM vectors for every item, kept on the CPU."""
    latents, contexts, ys = [], [], []
    tokens = models.tokenize(tokenizers, [it.caption for it in items])  # one padded length for the whole set
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prepared = [prepare(it.path, resolution) for it in chunk]
        pixels = torch.stack([p.pixels for p in prepared]).to(device)
        latents.append(sd.encode_images(pixels).float().cpu())
        context, pooled = sd.encode_text([t[start : start + batch_size].to(device) for t in tokens])
        contexts.append(context.float().cpu())
        if pooled is not None:
            target = [(resolution, resolution)] * len(chunk)
            y = sd.adm(pooled, [p.original_size for p in prepared], [p.crop for p in prepared], target)
            ys.append(y.float().cpu())
    return EncodedDataset(torch.cat(latents), torch.cat(contexts), torch.cat(ys) if ys else None)
