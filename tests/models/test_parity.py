"""Parity with the reference implementations (fp32, relative error < 1e-5): the engine's tiny models, written in
the single-file layout, converted by diffusers' single-file converters into diffusers / transformers models."""
import pytest
import torch
from models_testutil import SDXL_BIGG, diffusers_unet, diffusers_vae, hf_clip, hf_openclip, hf_openclip_sd2, rel_err

from gesso import models

TOL = 1e-5


@pytest.fixture(scope="module", params=["tiny-sdxl", "demo-sdxl", "tiny-sd15", "tiny-sd2"])  # demo-sdxl: fewer norm groups
def model(request):
    return models.build(request.param, seed=1).eval()


def random_ids(generator: torch.Generator, batch: int) -> torch.Tensor:
    """Token rows shaped like real prompts: start, random words, end, then padding with the end token."""
    ids = torch.full((batch, 77), 49407)
    ids[:, 0] = 49406
    for row, n in enumerate((5, 40, 75)[:batch]):
        ids[row, 1 : n + 1] = torch.randint(0, 49406, (n,), generator=generator)
    return ids


@torch.no_grad()
def test_unet_matches_diffusers(model):
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    ref = diffusers_unet(cfg, model.state_dict())
    b = 2
    x = torch.randn(b, 4, 16, 24, generator=g)  # non-square
    t = torch.tensor([3.0, 917.0])
    context = torch.randn(b, 154, cfg.unet.context_dim, generator=g)  # two prompt chunks
    if cfg.unet.adm_in_channels is None:
        ours, theirs = model.unet(x, t, context), ref(x, t, context).sample
    else:
        pooled = torch.randn(b, cfg.text_encoders[-1].proj_dim, generator=g)
        sizes = torch.tensor([[1024.0, 768.0], [512.0, 832.0]])
        crops = torch.tensor([[0.0, 0.0], [64.0, 16.0]])
        targets = torch.tensor([[1024.0, 1024.0], [896.0, 1152.0]])
        y = model.adm(pooled, sizes, crops, targets)
        ours = model.unet(x, t, context, y)
        time_ids = torch.cat([sizes, crops, targets], dim=1)  # (B, 6) as diffusers' SDXL pipeline builds it
        theirs = ref(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert theirs.abs().mean() > 0.05  # a random model whose output is not near zero
    assert rel_err(ours, theirs) < TOL


@torch.no_grad()
def test_vae_matches_diffusers(model):
    g = torch.Generator().manual_seed(0)
    ref = diffusers_vae(model.cfg, model.state_dict())
    pixels = torch.rand(2, 3, 40, 56, generator=g) * 2 - 1
    mean, logvar = model.vae.encode(pixels)
    dist = ref.encode(pixels).latent_dist
    assert rel_err(mean, dist.mean) < TOL
    assert rel_err(logvar, dist.logvar) < TOL
    z = torch.randn(2, 4, 5, 7, generator=g)
    assert rel_err(model.vae.decode(z), ref.decode(z).sample) < TOL


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_clip_text_matches_transformers(name):
    g = torch.Generator().manual_seed(0)
    model = models.build(name, seed=1)
    encoder = model.text_encoders[0]
    ref = hf_clip(encoder.cfg, model.state_dict())
    ids = random_ids(g, 3)
    hidden, pooled = encoder(ids)
    out = ref(ids, output_hidden_states=True)
    assert len(hidden) == len(out.hidden_states) == encoder.cfg.layers + 1
    assert rel_err(hidden[-2], out.hidden_states[-2]) < TOL  # SDXL's CLIP-L state
    assert rel_err(encoder.final_norm(hidden[-1]), out.last_hidden_state) < TOL  # SD 1.x's state
    assert rel_err(pooled, out.pooler_output) < TOL


@torch.no_grad()
def test_openclip_text_matches_transformers():
    g = torch.Generator().manual_seed(0)
    model = models.build("tiny-sdxl", seed=2)
    encoder = model.text_encoders[1]
    ref = hf_openclip(encoder.cfg, model.state_dict(), prefix=SDXL_BIGG)
    ids = random_ids(g, 3)
    ids[:, 77 - 60 :] = torch.where(ids[:, 77 - 60 :] == 49407, 0, ids[:, 77 - 60 :])  # bigG pads with 0
    hidden, pooled = encoder(ids)
    out = ref(ids, output_hidden_states=True)
    assert rel_err(hidden[-2], out.hidden_states[-2]) < TOL  # SDXL's penultimate state
    assert rel_err(pooled, out.text_embeds) < TOL


@torch.no_grad()
def test_encode_text_is_the_sdxl_recipe():
    """context = CLIP-L hidden[-2] ++ bigG hidden[-2] per 77-token chunk, pooled from the first chunk."""
    g = torch.Generator().manual_seed(0)
    model = models.build("tiny-sdxl", seed=3)
    chunk1, chunk2 = random_ids(g, 2)[:, None].unbind(0)  # (1, 77) each
    tokens = [torch.cat([chunk1, chunk2], dim=1)] * 2
    context, pooled = model.encode_text(tokens)
    te1, te2 = model.text_encoders
    for i, chunk in enumerate((chunk1, chunk2)):
        expected = torch.cat([te1(chunk)[0][-2], te2(chunk)[0][-2]], dim=-1)
        torch.testing.assert_close(context[:, 77 * i : 77 * (i + 1)], expected)
    torch.testing.assert_close(pooled, te2(chunk1)[1])


@torch.no_grad()
def test_sd2_text_matches_transformers():
    """SD 2.x conditions on ln_final(penultimate state) of OpenCLIP ViT-H; diffusers drops the last layer and
    takes transformers' last_hidden_state, which is the same tensor."""
    g = torch.Generator().manual_seed(0)
    model = models.build("tiny-sd2", seed=4)
    (encoder,) = model.text_encoders
    ref = hf_openclip_sd2(encoder.cfg, model.state_dict())
    ids = random_ids(g, 3)
    context, pooled = model.encode_text([ids])
    out = ref(ids, output_hidden_states=True)
    final_norm = ref.text_model.final_layer_norm if hasattr(ref, "text_model") else ref.final_layer_norm
    assert pooled is None
    assert rel_err(context, final_norm(out.hidden_states[-2])) < TOL
