"""Train the demo's base model (`demo-sdxl`) from scratch on synthetic pictures and write examples/demo-base.safetensors.

What it learns: flat shapes (circle, square, triangle) in six colours on flat backgrounds, drawn and captioned by
examples/make_demo.py's `base_picture` ("a red circle on a blue background", or without the background). It never
sees the demo's `gssdemo` style (black outlines, sunset gradients), which the demo's LoRA then teaches it.

Two stages, both on the CPU, both seeded (SEED), every step count below:
1. the VAE, as a plain autoencoder (the posterior mean, as the engine encodes) on 64 px crops of base pictures and of
   styled ones in random colours, so that it can draw what any LoRA asks of it; its latents are then standardised
   (an exact change of quant_conv and post_quant_conv) to zero mean and the std 1/latent_scale the engine assumes;
2. the UNet, epsilon prediction on the engine's scaled-linear schedule with min-SNR weighting (gamma 5), on cached
   latents of UNET_PICTURES base pictures and their mirror images, captions dropped 10% of the time (for CFG), an
   EMA of its weights kept and saved.
The text encoders stay at their seeded random init: the UNet learns to read their states.

    python scripts/train_demo_base.py [examples/demo-base.safetensors]
About 35 minutes on 2 CPU cores. The file is fp16 (about 20 MB) with the recipe in its metadata.
"""
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from make_demo import COLOURS, SHAPES, base_picture, styled_picture  # noqa: E402

from gesso.engine.data.images import to_pixels  # noqa: E402
from gesso.engine.diffusion import add_noise, min_snr_weight, scaled_linear_alphas_cumprod  # noqa: E402
from gesso.models import configs  # noqa: E402
from gesso.models.sd import build  # noqa: E402
from gesso.models.tokenizer import load_tokenizers, tokenize  # noqa: E402

SEED = 1234
SIZE = 128
VAE_STEPS, VAE_BATCH, VAE_CROP, VAE_LR = 1500, 16, 64, 2e-3
UNET_PICTURES, UNET_STEPS, UNET_BATCH, UNET_LR, EMA = 3000, 3000, 32, 1e-3, 0.998
CAPTION_DROPOUT = 0.1
if os.environ.get("DEMO_BASE_SMOKE"):  # a dry run of every stage at a few steps (tests/scripts)
    VAE_STEPS, VAE_BATCH, UNET_PICTURES, UNET_STEPS, UNET_BATCH = 2, 2, 8, 2, 2


def vae_picture(rng: random.Random) -> torch.Tensor:
    if rng.random() < 0.6:
        return to_pixels(base_picture(rng, SIZE)[0])
    sky = tuple(tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
    fg = tuple(rng.randrange(256) for _ in range(3))
    return to_pixels(styled_picture(rng.choice(SHAPES), fg, rng, SIZE, sky))


def train_vae(sd, rng: random.Random, log) -> None:
    vae = sd.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, VAE_LR, total_steps=VAE_STEPS, pct_start=0.05)
    for step in range(VAE_STEPS):
        crops = []
        for _ in range(VAE_BATCH):
            x, y = rng.randrange(SIZE - VAE_CROP + 1), rng.randrange(SIZE - VAE_CROP + 1)
            crops.append(vae_picture(rng)[:, y:y + VAE_CROP, x:x + VAE_CROP])
        x = torch.stack(crops)
        mean, _ = vae.encode(x)
        out = vae.decode(mean)
        loss = F.l1_loss(out, x) + F.mse_loss(out, x) + 1e-6 * mean.square().mean()  # a light pull keeps latents bounded
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == VAE_STEPS - 1:
            log(f"vae {step}/{VAE_STEPS} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def standardise_latents(sd, rng: random.Random) -> dict:
    """Shift and scale the latent space (exactly: quant_conv's mean rows and post_quant_conv's input) to zero mean
    per channel and one std over all of them equal to 1 / latent_scale."""
    vae = sd.vae
    x = torch.stack([to_pixels(base_picture(rng, SIZE)[0]) for _ in range(256)])
    mean, _ = vae.encode(x)
    mu = mean.mean(dim=(0, 2, 3))  # (4,)
    std = (mean - mu[None, :, None, None]).std().item()
    k = (1 / sd.cfg.latent_scale) / std
    z = vae.cfg.z_channels
    qc, pq = vae.quant_conv, vae.post_quant_conv
    # mean' = k (mean - mu): the first z output rows of quant_conv
    qc.bias[:z] = k * (qc.bias[:z] - mu)
    qc.weight[:z] *= k
    # post_quant_conv(z') must equal post_quant_conv(z' / k + mu)
    pq.bias += (pq.weight[:, :, 0, 0] @ mu)
    pq.weight /= k
    check = vae.encode(x)[0]
    return {"latent_mean_before": mu.tolist(), "latent_std_before": std, "latent_std_after": check.std().item()}


@torch.no_grad()
def encode_captions(sd, tokenizers, captions: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for i in range(0, len(captions), 64):
        chunk = captions[i:i + 64]
        context, pooled = sd.encode_text(tokenize(tokenizers, chunk))
        for j, c in enumerate(chunk):
            out[c] = (context[j], pooled[j])
    return out


def all_captions() -> list[str]:
    names = list(COLOURS)
    caps = [""]
    for kind in SHAPES:
        for fg in names:
            caps.append(f"a {fg} {kind}")
            caps += [f"a {fg} {kind} on a {bg} background" for bg in names if bg != fg]
    return caps


def train_unet(sd, rng: random.Random, gen: torch.Generator, log) -> None:
    tokenizers = load_tokenizers(sd.cfg)
    text = encode_captions(sd, tokenizers, all_captions())
    pictures = [base_picture(rng, SIZE) for _ in range(UNET_PICTURES)]
    with torch.no_grad():
        pixels = torch.stack([to_pixels(im) for im, _ in pictures])
        latents = torch.cat([sd.encode_images(pixels[i:i + 64]) for i in range(0, len(pixels), 64)])
    captions = [c for _, c in pictures]
    size = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)
    unet = sd.unet.train().requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=UNET_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, UNET_LR, total_steps=UNET_STEPS, pct_start=0.03)
    ac = scaled_linear_alphas_cumprod()
    for step in range(UNET_STEPS):
        idx = torch.randint(len(latents), (UNET_BATCH,), generator=gen)
        x0 = latents[idx]
        flip = torch.rand(UNET_BATCH, generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        caps = ["" if rng.random() < CAPTION_DROPOUT else captions[i] for i in idx.tolist()]
        context = torch.stack([text[c][0] for c in caps])
        pooled = torch.stack([text[c][1] for c in caps])
        y = sd.adm(pooled, size[:, :2].expand(UNET_BATCH, 2), size[:, 2:4].expand(UNET_BATCH, 2),
                   size[:, 4:].expand(UNET_BATCH, 2))
        t = torch.randint(0, 1000, (UNET_BATCH,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        pred = unet(add_noise(x0, noise, t, ac), t, context, y)
        w = min_snr_weight(t, ac, 5.0, "epsilon")
        loss = ((pred - noise).square().mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(EMA, (1 + step) / (10 + step))
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        if step % 100 == 0 or step == UNET_STEPS - 1:
            log(f"unet {step}/{UNET_STEPS} loss {loss.item():.4f}")
    unet.load_state_dict(ema)
    unet.eval().requires_grad_(False)


def main(out: str) -> None:
    torch.manual_seed(SEED)
    rng, gen = random.Random(SEED), torch.Generator().manual_seed(SEED)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f} s] {msg}", flush=True)

    sd = build(configs.DEMO_SDXL, seed=SEED)
    train_vae(sd, rng, log)
    stats = standardise_latents(sd, rng)
    log(f"latents standardised: {stats}")
    train_unet(sd, rng, gen, log)
    tensors = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.state_dict().items()}
    recipe = {"script": "scripts/train_demo_base.py", "seed": SEED, "size": SIZE,
              "vae": {"steps": VAE_STEPS, "batch": VAE_BATCH, "crop": VAE_CROP, "lr": VAE_LR},
              "unet": {"pictures": UNET_PICTURES, "steps": UNET_STEPS, "batch": UNET_BATCH, "lr": UNET_LR, "ema": EMA,
                       "caption_dropout": CAPTION_DROPOUT},
              "torch": torch.__version__, **stats}
    path = Path(out)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"gesso.demo_base": json.dumps(recipe), "modelspec.architecture": "demo-sdxl",
                                           "modelspec.title": "Gesso demo base (flat coloured shapes)"})
    tmp.replace(path)
    log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "examples" / "demo-base.safetensors"))
