"""Against a real consumer: diffusers' load_lora_weights reads our kohya files, and our reader reads diffusers' files.

The tiny models go to diffusers through diffusers' own single-file converters (tests/models/models_testutil.py);
outputs must agree to a relative error under 1e-5 in fp32, and every module of a file must land in the other side.
"""
import json

import pytest
import torch
from formats_testutil import diffusers_out, engine_out, export, pipeline, random_network, tiny, unet_inputs
from models_testutil import rel_err
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from gesso import models
from gesso.engine.lora import formats as lora_convert
from gesso.engine.lora import names
from gesso.engine.lora import network as lora
from gesso.engine.lora import tools as lora_tools
from gesso.engine.lora.files import read_lora, save_lora
from gesso.engine.lora.network import load_network

TOL = 1e-5


def lora_layers(module: torch.nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_our_kohya_file_loads_in_diffusers_with_equal_output(name, tmp_path):
    sd = tiny(name)
    pipe = pipeline(sd)
    inputs = unet_inputs(sd.cfg)
    base = engine_out(sd, inputs)
    network = random_network(sd.unet, seed=2)  # attention + LoCon, mixed ranks, alpha != rank
    path = tmp_path / "ours.safetensors"
    save_lora(path, network.kohya_state_dict(), {"ss_network_module": "networks.lora"})
    tensors, _ = read_lora(path)

    pipe.load_lora_weights(str(path))  # diffusers raises on any kohya key it cannot rename
    layers = lora_layers(pipe.unet)
    assert len(layers) == len(network.modules)  # every module of the file became a LoRA layer
    to_diffusers = names.original_to_diffusers_paths(sd.cfg.unet)
    for kohya, (_, path_in_unet, _) in network.paths.items():
        layer = layers[to_diffusers[path_in_unet]]
        (adapter,) = layer.lora_A.keys()
        assert torch.equal(layer.lora_A[adapter].weight.flatten(1), tensors[f"{kohya}.lora_down.weight"].flatten(1))
        assert torch.equal(layer.lora_B[adapter].weight.flatten(1), tensors[f"{kohya}.lora_up.weight"].flatten(1))
        assert layer.scaling[adapter] == pytest.approx(tensors[f"{kohya}.alpha"].item() / layer.r[adapter])

    ours, theirs = engine_out(sd, inputs), diffusers_out(pipe.unet, inputs)
    assert rel_err(base, theirs) > 1e-2  # the LoRA changes the output ...
    assert rel_err(ours, theirs) < TOL  # ... identically in both


@pytest.mark.slow
@torch.no_grad()
def test_text_encoder_modules_match_diffusers(tmp_path):
    """te1/te2 modules (OpenCLIP's q/k/v on rows of the fused in_proj) merged by us equal diffusers' loaded LoRA."""
    sd = tiny("tiny-sdxl")
    pipe = pipeline(sd)
    export(sd, tmp_path / "base.safetensors")
    layout = lora_convert.layout(sd.cfg)
    g = torch.Generator().manual_seed(3)
    modules = {}
    for name, target in layout.targets.items():
        if name.startswith("lora_te"):
            r = 3
            modules[name] = lora_convert.Module(torch.randn(r, target.shape[1], generator=g) * 0.1,
                                                torch.randn(target.shape[0], r, generator=g) * 0.1, alpha=2.0)
    assert len(modules) == 6 * (3 + 3)  # q, k, v, out, fc1, fc2 per layer, 3 layers per tiny tower
    path = tmp_path / "te.safetensors"
    save_lora(path, lora_convert.to_kohya(lora_convert.LoRA(modules, {}, layout)), {})
    pipe.load_lora_weights(str(path))
    assert len(lora_layers(pipe.text_encoder)) == len(lora_layers(pipe.text_encoder_2)) == 18

    lora_tools.merge_lora(tmp_path / "base.safetensors", [(path, 1.0)], tmp_path / "merged.safetensors")
    merged = models.load_model(tmp_path / "merged.safetensors")
    ids = torch.full((2, 77), 49407)
    ids[:, 0] = 49406
    ids[:, 1:9] = torch.randint(0, 49406, (2, 8), generator=g)
    (l_hidden, _), (g_hidden, g_pooled) = (enc(ids) for enc in merged.text_encoders)
    ref_l = pipe.text_encoder(ids, output_hidden_states=True)
    ref_g = pipe.text_encoder_2(ids, output_hidden_states=True)
    base_l = sd.text_encoders[0](ids)[0]
    assert rel_err(base_l[-2], ref_l.hidden_states[-2]) > 1e-2
    assert rel_err(l_hidden[-2], ref_l.hidden_states[-2]) < TOL
    assert rel_err(g_hidden[-2], ref_g.hidden_states[-2]) < TOL
    assert rel_err(g_pooled, ref_g.text_embeds) < TOL


def peft_lora_on_diffusers_unet(unet, seed: int) -> LoraConfig:
    """diffusers' own training path: add_adapter with PEFT (attention, res-block convs and linears), random weights."""
    config = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn2.to_k": 5},
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                                        "conv1", "conv2", "conv_shortcut", "time_emb_proj"])
    torch.manual_seed(seed)
    unet.add_adapter(config)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    return config


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_diffusers_saved_lora_reads_onto_engine(name, tmp_path):
    sd = tiny(name)
    pipe = pipeline(sd)
    config = peft_lora_on_diffusers_unet(pipe.unet, seed=4)
    pipe.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                           unet_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    tensors, metadata = read_lora(path)
    assert all(k.startswith("unet.") and k.endswith(("lora_A.weight", "lora_B.weight")) for k in tensors)
    assert "lora_adapter_metadata" in metadata  # alphas live only here

    inputs = unet_inputs(sd.cfg, seed=5)
    network = load_network(sd.unet, path)
    assert 2 * len(network.modules) == len(tensors) == 2 * len(lora_layers(pipe.unet))
    assert rel_err(engine_out(sd, inputs), diffusers_out(pipe.unet, inputs)) < TOL


def renamed(tensors: dict, rename) -> dict:
    return {rename(k): v for k, v in tensors.items()}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora.down", "processor", "bare peft", "comfyui"])
def test_other_spellings_read_to_the_same_modules(variant, tmp_path):
    """The same tiny SDXL LoRA in diffusers' older spellings, PEFT's prefix-less state dict and ComfyUI's saved
    layout reads to exactly the modules of the kohya file."""
    sd = tiny("tiny-sdxl")
    network = random_network(sd.unet, seed=6, locon=False)
    kohya = tmp_path / "k.safetensors"
    save_lora(kohya, network.kohya_state_dict(), {})
    reference = lora_convert.read(kohya, sd.cfg)
    scaled = lora_convert.to_diffusers(reference, sd.cfg)  # unet.<diffusers path>.lora_A/B, alpha folded into B
    if variant == "lora.down":
        tensors = renamed(scaled, lambda k: k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"))
    elif variant == "processor":  # diffusers' old attention-processor keys; the other modules keep lora.down/up
        def old(k):
            k = k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                k = k.replace(f".{proj}.lora.", f".processor.{proj.removesuffix('.0')}_lora.")
            return k
        tensors = renamed(scaled, old)
        assert any("processor.to_out_lora.down.weight" in k for k in tensors)
    elif variant == "bare peft":
        tensors = renamed(scaled, lambda k: k.removeprefix("unet."))
    else:  # ComfyUI's LoRA save: diffusion_model.<original path>.lora_up/lora_down.weight, .alpha
        tensors = renamed(network.kohya_state_dict(), lambda k: "diffusion_model." + network.paths[k.split(".")[0]][1] + "." + k.split(".", 1)[1])
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other))
    got = lora_convert.read(other, sd.cfg)
    assert not got.unplaced and sorted(got.modules) == sorted(reference.modules)
    for n, m in reference.modules.items():
        assert rel_err(got.modules[n].delta(m.up.shape[:1] + m.down.shape[1:]), m.delta(m.up.shape[:1] + m.down.shape[1:])) < 1e-6


def test_unplaceable_keys_are_named(tmp_path):
    sd = tiny("tiny-sdxl")
    network = random_network(sd.unet, seed=7, locon=False)
    tensors = network.kohya_state_dict()
    tensors["lora_unet_input_blocks_99_1_proj_in.lora_down.weight"] = torch.zeros(2, 4)
    path = tmp_path / "bad.safetensors"
    save_lora(path, tensors, {"x": json.dumps({})})
    network.remove()
    with pytest.raises(lora_convert.LoRAFileError, match="bad.safetensors.*lora_unet_input_blocks_99_1_proj_in"):
        load_network(sd.unet, path)
    assert not any(isinstance(m, lora.LORA_TYPES) for m in sd.unet.modules())  # nothing half-loaded
