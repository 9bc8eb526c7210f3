"""Loading from every source, bit for bit, and one-line errors for everything else."""
import pickle
import shutil

import pytest
import torch
from models_testutil import write_diffusers_folder
from safetensors.torch import save_file

from gesso import models
from gesso.models import files
from gesso.models.loaders import CheckpointError, load_model, open_checkpoint


def state_of(name: str, seed: int = 5) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in models.build(name, seed=seed).state_dict().items()}


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    save_file(state_of("tiny-sdxl"), path)
    return path


def assert_same(model, state: dict[str, torch.Tensor], dtype=None) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        want = value if dtype is None or not value.is_floating_point() else value.to(dtype)
        assert loaded[key].dtype == want.dtype and torch.equal(loaded[key], want), key


def test_single_file_loads_bit_identical_and_detects_its_config(sdxl_file):
    ckpt = open_checkpoint(sdxl_file)
    assert (ckpt.family, ckpt.config.name, ckpt.comparison.ok) == ("sdxl", "tiny-sdxl", True)
    assert_same(load_model(sdxl_file), state_of("tiny-sdxl"))


@pytest.mark.parametrize("name, family", [("tiny-sd15", "sd15"), ("tiny-sd2", "sd2")])
def test_other_families_are_detected_and_load(tmp_path, name, family):
    state = state_of(name)
    save_file(state, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    assert (ckpt.family, ckpt.config.name) == (family, name)
    assert_same(load_model(tmp_path / "m.safetensors"), state)


def test_headers_only_until_weights_are_needed(sdxl_file, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(files, "safe_open", no_reads)
    assert open_checkpoint(sdxl_file).comparison.ok
    with pytest.raises(CheckpointError, match="tensor data read"):  # the reader names the file around any fault
        load_model(sdxl_file)


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_low_precision_files(tmp_path, file_dtype):
    state = state_of("tiny-sd15")
    stored = {k: v.to(file_dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file(stored, tmp_path / "m.safetensors")
    model = load_model(tmp_path / "m.safetensors", dtype=torch.bfloat16)
    assert_same(model, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in stored.items()})


def test_optional_and_ignored_keys(tmp_path):
    state = state_of("tiny-sdxl")
    del state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]
    del state["conditioner.embedders.1.model.logit_scale"]
    extras = {"betas": torch.rand(1000), "model_ema.decay": torch.tensor(0.999), "denoiser.sigmas": torch.rand(10)}
    save_file(state | extras, tmp_path / "m.safetensors")
    model = load_model(tmp_path / "m.safetensors")
    assert torch.equal(model.text_encoders[0].transformer.text_model.embeddings.position_ids, torch.arange(77)[None])
    assert model.text_encoders[1].model.logit_scale.item() == pytest.approx(4.6052)
    assert_same(model, state | {k: model.state_dict()[k] for k in model.state_dict().keys() - state.keys()})


def test_position_ids_are_always_the_arange(tmp_path):
    """Some merged fine-tunes store position_ids as floats like 76.9999, which would truncate to 76."""
    state = state_of("tiny-sd15")
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    state[key] = torch.arange(77, dtype=torch.float32)[None] - 1e-3
    save_file(state, tmp_path / "m.safetensors")
    assert torch.equal(load_model(tmp_path / "m.safetensors").state_dict()[key], torch.arange(77)[None])


def test_legacy_ckpt(tmp_path):
    state = state_of("tiny-sd15")
    torch.save({"state_dict": state, "global_step": 470000}, tmp_path / "m.ckpt")
    assert_same(load_model(tmp_path / "m.ckpt"), state)


class NotWeights:
    pass


def test_ckpt_with_code_is_refused(tmp_path):
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": NotWeights()}, f)
    with pytest.raises(CheckpointError, match="evil.ckpt: not loadable as a weights-only"):
        load_model(tmp_path / "evil.ckpt")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Diffusers folders: SDXL with the Hub's `text_model.` text-encoder keys, SD 1.5 with today's flat keys."""
    root = tmp_path_factory.mktemp("diffusers")
    write_diffusers_folder(models.build("tiny-sdxl", seed=5), root / "tiny-sdxl", text_model_prefix=True)
    write_diffusers_folder(models.build("tiny-sd15", seed=5), root / "tiny-sd15", text_model_prefix=False)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_diffusers_folder_equals_single_file(tmp_path, folders, name):
    save_file(state_of(name), tmp_path / "single.safetensors")
    from_folder, from_file = load_model(folders / name), load_model(tmp_path / "single.safetensors")
    assert open_checkpoint(folders / name).kind == "diffusers"
    assert_same(from_folder, from_file.state_dict())


@pytest.mark.slow
def test_diffusers_folder_with_a_foreign_key_is_refused(tmp_path, folders):
    shutil.copytree(folders / "tiny-sd15", tmp_path / "pipe")
    weights = tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    save_file(load_file(weights) | {"encoder.extra_block.weight": torch.zeros(2)}, weights)
    with pytest.raises(CheckpointError, match="'encoder.extra_block.weight' has no place"):
        load_model(tmp_path / "pipe")


def hub_cache(root, repo_id: str, content) -> None:
    """huggingface_hub's cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(content, repo / "snapshots" / commit)


@pytest.mark.slow
def test_hub_repo_id_from_the_local_cache(tmp_path, sdxl_file, folders):
    hub_cache(tmp_path / "hub", "someone/tiny-sdxl", folders / "tiny-sdxl")
    (tmp_path / "single").mkdir()
    shutil.copy(sdxl_file, tmp_path / "single")
    hub_cache(tmp_path / "hub", "someone/tiny-sdxl-single", tmp_path / "single")
    reference = load_model(sdxl_file).state_dict()
    for repo in ("someone/tiny-sdxl", "someone/tiny-sdxl-single"):
        assert_same(load_model(repo, cache_dir=tmp_path / "hub"), reference)
    tokenizers = models.load_tokenizers(models.configs.TINY_SDXL, "someone/tiny-sdxl", cache_dir=tmp_path / "hub")
    assert [t.pad_token_id for t in tokenizers] == [49407, 0]
    with pytest.raises(CheckpointError, match="someone/absent: not a local path, and not in the Hugging Face cache; download it first with `hf download someone/absent`"):
        load_model("someone/absent", cache_dir=tmp_path / "hub")


def header_only(path, keys: dict[str, list[int]]) -> None:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, path)


@pytest.mark.parametrize("keys, message", [
    ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": [4, 64]}, "a LoRA"),
    ({"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": [6, 2],
      "model.diffusion_model.x_embedder.proj.weight": [2, 4, 2, 2]}, "Stable Diffusion 3"),
    ({"double_blocks.0.img_attn.qkv.weight": [6, 2], "single_blocks.0.linear1.weight": [2, 2]}, "Flux"),
    ({"encoder.down.0.block.0.conv1.weight": [2, 2, 3, 3], "decoder.up.0.block.0.conv1.weight": [2, 2, 3, 3],
      "quant_conv.weight": [8, 8, 1, 1]}, "a VAE-only file"),
    ({"model.diffusion_model.input_blocks.0.0.weight": [32, 4, 3, 3]}, "a UNet without text encoders"),
    ({"weight": [3, 3]}, "not a Stable Diffusion checkpoint"),
], ids=["lora", "sd3", "flux", "vae-only", "unet-only", "other"])
def test_unsupported_files_name_what_they_are(tmp_path, keys, message):
    header_only(tmp_path / "x.safetensors", keys)
    with pytest.raises(CheckpointError, match=message) as info:
        open_checkpoint(tmp_path / "x.safetensors")
    assert "\n" not in str(info.value) and "x.safetensors" in str(info.value)


def test_truncated_and_non_checkpoint_files(tmp_path, sdxl_file):
    data = sdxl_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors: truncated: tensor '.*' ends at byte"):
        open_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="head.safetensors: not a safetensors file"):
        open_checkpoint(tmp_path / "head.safetensors")
    (tmp_path / "notes.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00this is not json!!")
    with pytest.raises(CheckpointError, match="notes.safetensors: safetensors header is not valid JSON"):
        open_checkpoint(tmp_path / "notes.safetensors")
    with pytest.raises(CheckpointError, match="no such file: "):
        open_checkpoint(tmp_path / "absent.safetensors")


def test_shape_mismatch_is_refused_with_the_key(tmp_path):
    state = state_of("tiny-sdxl")
    state["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 5, 5)
    save_file(state, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"1 mismatched keys .* tiny-sdxl .*out\.2\.weight: file \(4, 32, 5, 5\)"):
        load_model(tmp_path / "m.safetensors")
