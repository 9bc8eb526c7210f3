"""Preview images during training: the config's prompts rendered with the LoRA as trained so far.

Each prompt may carry kohya's per-prompt options (`--w 832 --h 1216 --s 28 --l 6 --d 42 --n ...`,
engine/sampling/options.py) over the [sample] section's defaults. The infotext names the epoch's LoRA file as
`sample` and `grid` do, `<lora:name-000002:1>` and its `Lora hashes` entry, so that AUTOMATIC1111 renders the same
image from the PNG and that file; an epoch that saved no file has neither.
"""
from dataclasses import replace
from pathlib import Path

import torch

from gesso.engine.config.sections import Config
from gesso.engine.sampling import render
from gesso.engine.sampling.options import fit_side, split_options


def preview_settings(cfg: Config, multiple: int) -> list[render.Settings]:
    """The settings of each preview prompt: the [sample] section, then the prompt's own kohya options."""
    s = cfg.sample
    out = []
    for i, line in enumerate(s.prompts):
        prompt, o = split_options(line)
        out.append(render.Settings(
            prompt, s.negative_prompt if o.negative_prompt is None else o.negative_prompt, o.steps or s.steps,
            o.sampler or s.sampler, s.cfg_scale if o.cfg_scale is None else o.cfg_scale, s.seed + i if o.seed is None else o.seed,
            cfg.dataset.resolution if o.width is None else fit_side(o.width, multiple),
            cfg.dataset.resolution if o.height is None else fit_side(o.height, multiple)))
    return out


@torch.no_grad()
def render_previews(sd, tokenizers, cfg: Config, folder: Path, label: str, device: torch.device,
                    lora_file: Path | None = None, step: int = 0, bar=None, log=None) -> list[Path]:
    """One PNG per prompt in `folder`, named <name>-<label>-<i>.png (label `e000002` after epoch 2, `step00000012` for
    a host's preview-now at step 12), with A1111 parameters in each.

    lora_file: the LoRA file saved at this epoch (or step), named in the infotext. bar: the training bar (tqdm), told which
    preview is rendering. log: the run's RunLog (engine/run/logs.py), which gets each image for TensorBoard at `step`.
    """
    vae_device = next(sd.vae.parameters()).device
    text_device = [next(e.parameters()).device for e in sd.text_encoders]
    sd.vae.to(device)  # the VAE and text encoders left the GPU after caching; borrow them back
    for e in sd.text_encoders:
        e.to(device)
    name = Path(cfg.model.checkpoint).stem if cfg.model.checkpoint else cfg.model.name
    pipe = render.Pipeline(sd, tokenizers, name, lora_file.parent if lora_file else None)
    settings = preview_settings(cfg, render.size_multiple(pipe))
    paths = []
    try:
        for i, s in enumerate(settings):
            if bar is not None:
                bar.set_description_str(f"rendering previews {i + 1}/{len(settings)}", refresh=True)
            # the network in training is already in the UNet: the tag goes into the infotext only, never into render()
            (image, parameters), = render.render(pipe, s)
            if lora_file is not None:
                parameters = render.infotext(pipe, replace(s, prompt=f"{s.prompt} <lora:{lora_file.stem}:1>"))
            paths.append(render.save_png(image, folder / f"{cfg.output.name}-{label}-{i:02d}.png", parameters))
            if log is not None:
                log.image(f"preview/{i:02d}", image, step)
    finally:
        if bar is not None:
            bar.set_description_str("", refresh=True)
        sd.vae.to(vae_device)
        for e, d in zip(sd.text_encoders, text_device):
            e.to(d)
    return paths
