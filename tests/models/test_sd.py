"""Behaviour of the assembled model that the training loop relies on."""
import math

import pytest
import torch
from torch import nn

from gesso import models
from gesso.models.configs import SDXL_BASE

KOHYA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def kohya_targets(unet: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in unet.named_modules() if n.endswith(KOHYA_TARGETS)}


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = models.build("tiny-sdxl", seed=7).state_dict()
    assert torch.equal(torch.rand(1), before)
    b = models.build("tiny-sdxl", seed=7).state_dict()
    c = models.build("tiny-sdxl", seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.diffusion_model.out.2.weight"], c["model.diffusion_model.out.2.weight"])


def test_kohya_targets_are_plain_linears():
    """The engine swaps these for LoRA modules: 722 in SDXL (REFERENCE.md, kohya defaults)."""
    with torch.device("meta"):
        full = kohya_targets(models.build(SDXL_BASE, device="meta").unet)
    assert len(full) == 722
    assert all(type(m) is nn.Linear for m in full.values())
    tiny = kohya_targets(models.build("tiny-sd15").unet)
    assert {type(m) for n, m in tiny.items() if n.endswith(("proj_in", "proj_out"))} == {nn.Conv2d}


def test_no_zero_initialised_outputs():
    """Random weights give a non-trivial output, so LoRA training on a random model can lower a loss."""
    model = models.build("tiny-sdxl")
    for name in ("out.2.weight", "input_blocks.4.1.proj_out.weight", "middle_block.1.transformer_blocks.0.attn1."
                 "to_out.0.weight", "input_blocks.1.0.out_layers.3.weight"):
        assert model.unet.state_dict()[name].abs().max() > 0, name


def test_gradient_checkpointing_gives_the_same_output_and_grads():
    g = torch.Generator().manual_seed(0)
    model = models.build("tiny-sdxl")
    unet = model.unet
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 77, 96, generator=g)
    y = torch.randn(2, 1600, generator=g)
    results = []
    for ckpt in (False, True):
        unet.gradient_checkpointing = ckpt
        unet.zero_grad()
        out = unet(x, t, ctx, y)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], msg=name)


def test_adm_layout():
    """y = pooled ++ [cos, sin] embeddings of (orig h, orig w, crop top, crop left, target h, target w)."""
    model = models.build("tiny-sdxl")
    pooled = torch.randn(1, 64)
    y = model.adm(pooled, [(1024, 768)], [(16, 32)], [(896, 1152)])
    assert y.shape == (1, 64 + 6 * 256)
    assert torch.equal(y[:, :64], pooled)
    for i, number in enumerate((1024, 768, 16, 32, 896, 1152)):
        emb = y[0, 64 + 256 * i : 64 + 256 * (i + 1)]
        freq = math.exp(-math.log(10000) * 3 / 128)
        # fp32 arguments near 1000 rad round at ~1e-4
        assert emb[3].item() == pytest.approx(math.cos(number * freq), abs=3e-4)
        assert emb[128 + 3].item() == pytest.approx(math.sin(number * freq), abs=3e-4)
    with pytest.raises(ValueError, match="no ADM"):
        models.build("tiny-sd15").adm(pooled, [(1, 1)], [(0, 0)], [(1, 1)])


def test_image_latents_are_the_scaled_posterior_mean():
    model = models.build("tiny-sdxl")
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = model.encode_images(pixels)
        mean, _ = model.vae.encode(pixels)
        assert torch.equal(latents, model.encode_images(pixels))
        torch.testing.assert_close(latents, mean * 0.13025)
        torch.testing.assert_close(model.decode_latents(latents), model.vae.decode(mean))
    assert latents.shape == (1, 4, 4, 4)


def test_sd15_context_is_the_final_normed_last_state():
    model = models.build("tiny-sd15")
    ids = torch.randint(0, 49406, (2, 154))
    with torch.no_grad():
        context, pooled = model.encode_text([ids])
        (encoder,) = model.text_encoders
        hidden, _ = encoder(ids[:, 77:])
        torch.testing.assert_close(context[:, 77:], encoder.final_norm(hidden[-1]))
    assert pooled is None
