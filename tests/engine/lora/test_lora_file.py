import hashlib
import json

import pytest
import torch

from gesso.engine.lora import names
from gesso.engine.lora.files import LoRAFileError, read_lora, save_lora


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"lora_unet_a_b.lora_down.weight": torch.randn(4, 8, generator=g), "lora_unet_a_b.lora_up.weight": torch.randn(8, 4, generator=g),
            "lora_unet_a_b.alpha": torch.tensor(2.0)}


def test_roundtrip_metadata_and_header(tmp_path):
    path = tmp_path / "x.safetensors"
    save_lora(path, tensors(), {"ss_network_dim": 4, "ss_tag_frequency": json.dumps({"d": {"cat": 2}}), "modelspec.title": "x"})
    raw = path.read_bytes()
    assert raw[8:10] == b'{"'  # AUTOMATIC1111 checks these two bytes
    got, meta = read_lora(path)
    assert all(torch.equal(got[k], v) for k, v in tensors().items())
    assert meta["ss_network_dim"] == "4" and json.loads(meta["ss_tag_frequency"]) == {"d": {"cat": 2}}
    header_len = int.from_bytes(raw[:8], "little")
    # the model hash covers the tensor bytes only, so metadata changes do not change it
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header_len:]).hexdigest()
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed, not left behind


def test_rejects_dotted_module_names(tmp_path):
    with pytest.raises(LoRAFileError, match="must not contain dots"):
        save_lora(tmp_path / "x.safetensors", {"lora_unet_a.b.lora_down.weight": torch.ones(1, 1)}, {})


def test_missing_alpha_means_scale_one_and_garbage_is_named(tmp_path):
    from gesso import models
    from gesso.engine.lora import formats as lora_convert

    unet = models.build("tiny-sdxl", seed=0).unet
    path = names.attention_targets(unet)[0]
    base = unet.get_submodule(path)
    name = names.kohya_name("lora_unet_", path)
    g = torch.Generator().manual_seed(1)
    no_alpha = {f"{name}.lora_down.weight": torch.randn(4, base.in_features, generator=g),
                f"{name}.lora_up.weight": torch.randn(base.out_features, 4, generator=g)}
    save_lora(tmp_path / "no_alpha.safetensors", no_alpha, {})
    assert lora_convert.read(tmp_path / "no_alpha.safetensors", unet.cfg).modules[name].alpha == 4.0  # alpha = rank: scale 1
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(LoRAFileError, match="bad.safetensors"):
        read_lora(bad)
