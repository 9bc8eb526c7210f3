"""The one model lookup: a built-in name or a checkpoint, found the same way, and refused with the same error and
message, by training, the memory prediction, rendering, sampling and the LoRA tools."""
import pytest
import torch
from safetensors.torch import save_file

from gesso import models
from gesso.engine.config.sections import Config, ModelSection
from gesso.engine.loop.inputs import load_model
from gesso.engine.lora.tools import convert_lora
from gesso.engine.memory.memtrace import model_config
from gesso.engine.sampling.render import load_pipeline
from gesso.engine.sampling.sample import sample
from gesso.errors import CheckpointError
from gesso.models.lookup import find_model, recorded_model


def test_a_built_in_name_is_its_architecture_at_random_init():
    found = find_model("tiny-sdxl")
    assert found.checkpoint is None and found.name == "tiny-sdxl" and found.config == models.configs.TINY_SDXL
    sd = found.load(torch.bfloat16, seed=3, vae_dtype=torch.float32)
    assert sd.unet.input_blocks[0][0].weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for e in sd.text_encoders for p in e.parameters())
    reference = models.build("tiny-sdxl", seed=3)
    # the VAE is cast once, from fp32 to its own dtype: bit for bit the fp32 build, never a round trip through bf16
    assert all(torch.equal(a, b) for a, b in zip(sd.vae.state_dict().values(), reference.vae.state_dict().values()))
    assert torch.equal(sd.unet.input_blocks[0][0].weight, reference.unet.input_blocks[0][0].weight.bfloat16())


@pytest.mark.slow
def test_a_checkpoint_file_is_read_by_its_headers_then_loaded(tmp_path):
    sd = models.build("tiny-sdxl", seed=1)
    save_file({k: v.contiguous() for k, v in sd.state_dict().items()}, tmp_path / "mine.safetensors")
    found = find_model(tmp_path / "mine.safetensors", "model.checkpoint")
    assert found.name == "mine" and found.checkpoint is not None and found.config.unet == models.configs.TINY_SDXL.unet
    loaded = found.load()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.state_dict().items() if "position_ids" not in k)
    assert len(found.tokenizers()) == 2
    assert recorded_model(str(tmp_path / "mine.safetensors")).name == "mine"


def test_what_a_lora_records_is_found_only_when_it_is_here(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    assert recorded_model("tiny-sd15").config == models.configs.TINY_SD15
    assert recorded_model("sd_xl_base_1.0.safetensors") is None  # the trainer's file name, not here
    assert recorded_model(str(tmp_path / "broken.safetensors")) is None
    assert recorded_model("") is None


@pytest.mark.parametrize("source, message", [
    ("nope", "model.name: unknown model config 'nope'; built-in: demo-sdxl, sd15, sd21, sdxl, tiny-sd15, tiny-sd2, "
             "tiny-sdxl, or a checkpoint file, diffusers folder or Hub repo id in the local cache"),
    ("{tmp}/models/mine.safetensors", "model.name: no such file: {tmp}/models/mine.safetensors"),
])
def test_a_source_that_names_nothing_is_one_line_naming_the_key(tmp_path, source, message):
    with pytest.raises(CheckpointError) as info:
        find_model(source.format(tmp=tmp_path), "model.name")
    assert str(info.value) == message.format(tmp=tmp_path)


def test_every_caller_refuses_an_unknown_model_with_the_lookup_s_error(tmp_path):
    unknown = Config(model=ModelSection(name="nope"))
    callers = {
        "training": lambda: load_model(unknown),
        "memory": lambda: model_config(unknown),
        "rendering": lambda: load_pipeline(find_model("nope", "model")),
        "sampling": lambda: sample("a cat", "nope", steps=1, progress=False),
        "lora tools": lambda: convert_lora(tmp_path / "a.safetensors", tmp_path / "b.safetensors", model="nope"),
    }
    for caller, call in callers.items():
        with pytest.raises(CheckpointError, match=r"^model(\.name)?: unknown model config 'nope'; built-in: demo-sdxl"):
            call()
