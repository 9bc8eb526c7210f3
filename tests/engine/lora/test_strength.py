"""A LoRA's strength and block-wise weights at inference time in the engine's own model."""
import pytest
from formats_testutil import engine_out, random_network, tiny, unet_inputs
from models_testutil import rel_err

from gesso.engine.lora.files import save_lora
from gesso.engine.lora.network import load_network


@pytest.fixture
def setup(tmp_path):
    sd = tiny("tiny-sdxl")
    network = random_network(sd.unet, seed=1)
    tensors = network.kohya_state_dict()
    network.remove()
    path = tmp_path / "a.safetensors"
    save_lora(path, tensors, {})
    return sd, tensors, path, tmp_path


def scaled(tensors: dict, factor, where=lambda name: True) -> dict:
    return {k: v * factor if k.endswith("lora_up.weight") and where(k.split(".")[0]) else v for k, v in tensors.items()}


def out_with(sd, path, inputs, multiplier=1.0):
    network = load_network(sd.unet, path, multiplier=multiplier)
    out = engine_out(sd, inputs)
    network.remove()
    return out


@pytest.mark.slow
def test_strength_scales_the_update(setup):
    sd, tensors, path, tmp = setup
    inputs = unet_inputs(sd.cfg)
    save_lora(tmp / "half.safetensors", scaled(tensors, 0.35), {})
    assert rel_err(out_with(sd, path, inputs, 0.35), out_with(sd, tmp / "half.safetensors", inputs)) < 1e-5
    assert rel_err(out_with(sd, path, inputs, 0.0), engine_out(sd, inputs)) < 1e-6
    assert rel_err(out_with(sd, path, inputs, 0.35), out_with(sd, path, inputs, 1.0)) > 1e-3


def test_block_weights_temper_and_mute_blocks(setup):
    sd, tensors, path, tmp = setup
    inputs = unet_inputs(sd.cfg, seed=1)
    in_middle = lambda name: name.startswith("lora_unet_middle_block")  # noqa: E731
    in_block4 = lambda name: name.startswith("lora_unet_input_blocks_4_")  # noqa: E731
    reference = {k: v for k, v in scaled(tensors, 0.5, in_block4).items() if not in_middle(k.split(".")[0])}
    save_lora(tmp / "ref.safetensors", scaled(reference, 0.8), {})

    network = load_network(sd.unet, path)
    network.set_block_weights({"middle_block": 0.0, "input_blocks.4": 0.5})
    network.set_multiplier(0.8)  # the multiplier and the block weights compose
    ours = engine_out(sd, inputs)
    network.remove()
    assert rel_err(ours, out_with(sd, tmp / "ref.safetensors", inputs)) < 1e-5
    assert rel_err(ours, out_with(sd, path, inputs, 0.8)) > 1e-3


def test_unknown_block_is_refused(setup):
    sd, _, path, _ = setup
    network = load_network(sd.unet, path)
    with pytest.raises(ValueError, match="input_blocks.12.*blocks: "):
        network.set_block_weights({"input_blocks.12": 0.0})  # a typo must not silently do nothing
    assert all(m.multiplier == 1.0 for m in network.modules.values())
