"""Preview images during training: the config's prompts rendered with the LoRA as trained so far."""
from pathlib import Path

import torch

from gesso.engine.config import Config
from gesso.engine.sampling import render


@torch.no_grad()
def render_previews(sd, tokenizers, cfg: Config, folder: Path, epoch: int, device: torch.device) -> list[Path]:
    """One PNG per prompt in `folder`, named <name>-e<epoch>-<i>.png, with A1111 parameters in each."""
    s = cfg.sample
    vae_device = next(sd.vae.parameters()).device
    text_device = [next(e.parameters()).device for e in sd.text_encoders]
    sd.vae.to(device)  # the VAE and text encoders left the GPU after caching; borrow them back
    for e in sd.text_encoders:
        e.to(device)
    pipe = render.Pipeline(sd, tokenizers, cfg.model.checkpoint or cfg.model.name)
    paths = []
    try:
        for i, prompt in enumerate(s.prompts):
            settings = render.Settings(prompt, s.negative_prompt, s.steps, s.sampler, s.cfg_scale, s.seed + i,
                                       cfg.dataset.resolution, cfg.dataset.resolution)
            image, parameters = render.render(pipe, settings)[0]
            paths.append(render.save_png(image, folder / f"{cfg.output.name}-e{epoch:06d}-{i:02d}.png", parameters))
    finally:
        sd.vae.to(vae_device)
        for e, d in zip(sd.text_encoders, text_device):
            e.to(d)
    return paths
