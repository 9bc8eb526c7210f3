"""`sample` and `grid` apply a LoRA's text-encoder modules (kohya's lora_te_/lora_te1_/lora_te2_), at the tag's te
strength, as the training previews do with the live network and as AUTOMATIC1111 and ComfyUI do with the file."""
import pytest
import torch

from gesso import models
from gesso.engine.lora import names
from gesso.engine.lora import network as lora
from gesso.engine.lora.files import save_lora
from gesso.engine.sampling import render
from gesso.engine.sampling import sample as single


def build(name: str):
    return models.build(name, seed=0).eval().requires_grad_(False)


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-sd15"])
def trained(request, tmp_path_factory):
    """A file with UNet and text-encoder modules (random up weights, so that every module changes its layer),
    and the live network it was saved from, on a model of its own."""
    sd = build(request.param)
    paths = names.attention_targets(sd.unet)
    unet = lora.inject(sd.unet, paths, "lora_unet_", 4, 2.0,
                       names=names.unet_kohya_names(sd.unet, paths) if sd.cfg.family == "sd" else None)
    network = lora.combine(unet, lora.inject_text_encoders(sd, 4, 2.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in network.modules.values():
            m.lora_up.copy_(torch.randn(m.lora_up.shape, generator=g) * 0.05)
    folder = tmp_path_factory.mktemp("loras")
    save_lora(folder / "te.safetensors", network.kohya_state_dict(), {})
    assert any(k.startswith("lora_te") for k in network.modules)
    return request.param, folder, sd, network


def encodings(pipe: render.Pipeline, prompt: str) -> torch.Tensor:
    text, tags = render.prompts.extract_lora_tags(prompt)
    render.set_lora(pipe, tags)
    context, pooled = render.encode_pair(pipe, text, "", "a1111")
    return torch.cat([context.flatten(), torch.zeros(0) if pooled is None else pooled.flatten()])


def test_text_modules_encode_as_the_live_network(trained):
    name, folder, live, network = trained
    pipe = render.Pipeline(build(name), models.load_tokenizers(live.cfg), name, folder)
    own = {k: v.clone() for k, v in pipe.sd.state_dict().items()}
    base = encodings(pipe, "a red circle")
    for te, unet in ((0.7, 0.7), (0.4, 1.0)):
        got = encodings(pipe, f"a red circle <lora:te:{te}:{unet}>" if te != unet else f"a red circle <lora:te:{te}>")
        network.set_multiplier(te)  # the live network's encoders (its UNet strength plays no part in the text)
        with torch.no_grad():
            want = torch.cat([t.flatten() for t in render.prompts.encode(live, pipe.tokenizers, ["a red circle", ""])
                              if t is not None])
        assert not torch.allclose(got, base, atol=1e-3)  # the text modules act
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max().item()
        assert pipe.attached[1].multiplier == unet
    assert torch.equal(encodings(pipe, "a red circle <lora:te:0:1>"), base)  # te strength 0: the encoders' own
    encodings(pipe, "a red circle")  # no tag: the file comes off
    assert pipe.attached is None and pipe.text_lora is None
    assert all(torch.equal(v, own[k]) for k, v in pipe.sd.state_dict().items())  # every weight back, bit for bit


@pytest.mark.slow
def test_sample_renders_with_the_text_modules(trained):
    name, folder, _, _ = trained
    kw = dict(steps=2, width=64, height=64, seed=3, device="cpu", sampler="euler", lora_dir=folder)
    both = single.sample("a red circle <lora:te:1>", name, **kw)[0]
    unet_only = single.sample("a red circle <lora:te:0:1>", name, **kw)[0]
    assert both.tobytes() != unet_only.tobytes()  # the text modules reach the image
