"""What the kernels read of the GPU (kernels/device.py), and `train.mixed_precision = "auto"` resolved from it, under
stubbed device properties: bf16 where the GPU has bf16 tensor cores, fp16 (with the loss scaler) on Turing, fp32 on
the CPU."""
from types import SimpleNamespace

import pytest
import torch

from gesso.engine.config.load import load_config
from gesso.engine.memory import memtrace
from gesso.kernels import device

CUDA = torch.device("cuda", 0)


@pytest.fixture
def capability(monkeypatch):
    def stub(major: int, minor: int, shared: int = 101376, name: str = "stub"):
        props = SimpleNamespace(name=name, major=major, minor=minor, shared_memory_per_block_optin=shared,
                                total_memory=16 * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
        device._gpu.cache_clear()
    yield stub
    device._gpu.cache_clear()


@pytest.mark.parametrize("major,minor,expected", [
    (7, 5, "fp16"),  # Turing (RTX 20xx, T4): fp16 tensor cores only
    (8, 0, "bf16"),  # A100
    (8, 9, "bf16"),  # RTX 40xx, L4
    (9, 0, "bf16"),  # H100, H200
])
def test_auto_precision_follows_the_gpu(capability, major, minor, expected):
    capability(major, minor)
    assert device.precision("auto", CUDA) == expected


def test_auto_precision_is_fp32_on_the_cpu_and_a_chosen_one_stays():
    assert device.precision("auto", torch.device("cpu")) == "no"
    for mode in ("no", "bf16", "fp16"):
        assert device.precision(mode, torch.device("cpu")) == mode


def test_the_gpus_facts(capability):
    capability(8, 6, shared=101376, name="NVIDIA GeForce RTX 3090")
    gpu = device.gpu(CUDA)
    assert (gpu.name, gpu.arch, gpu.shared_memory, gpu.bf16, gpu.fp8) == ("NVIDIA GeForce RTX 3090", 86, 101376, True, False)
    capability(8, 9)
    assert device.gpu(CUDA).fp8 and device.SHARED_MEMORY_OPTIN[device.gpu(CUDA).arch] == 101376


@pytest.mark.slow
def test_auto_is_the_default_and_the_memory_prediction_takes_a_gpus_bf16(tmp_path, monkeypatch):
    monkeypatch.setenv("GESSO_KERNELS", "auto")  # the prediction's step runs on the meta device: the references
    demo = tmp_path / "demo.toml"
    demo.write_text(f'[dataset]\npath = "{tmp_path}"\nresolution = 64\n[model]\nname = "tiny-sdxl"\n')
    auto = load_config(demo)
    assert auto.train.mixed_precision == "auto"
    predicted = memtrace.predict(auto)
    bf16 = memtrace.predict(load_config(demo, ["train.mixed_precision='bf16'"]))
    assert predicted.precision == "bf16" and predicted.peak_gib == bf16.peak_gib
