"""`gesso doctor` tells the truth about the machine: on this CPU one that says there is no GPU, with the versions,
the dispatch mode, where the caches are and a config's memory plan; on a GPU its facts (stubbed here)."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import triton

from gesso.commands import doctor
from gesso.kernels import device

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_doctor_on_a_cpu_machine_says_there_is_no_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine's doctor describes its GPU (the stubbed test below) and runs the self-check")
    env = {k: v for k, v in os.environ.items() if k not in ("GESSO_KERNELS", "TRITON_INTERPRET")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    done = subprocess.run([sys.executable, "-m", "gesso.cli", "doctor", str(ROOT / "tests" / "data" / "demo.toml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("device: CPU") and lines[0].endswith("no GPU: kernels run only through the interpreter in tests")
    assert f"torch {torch.__version__} (CUDA None), triton {triton.__version__}, driver none, gesso 0.1.0" in lines[1]
    assert lines[2] == "kernels: GESSO_KERNELS=auto"
    assert f"verdicts: {tmp_path / 'cache' / 'gesso' / 'kernel-verdicts.json'}" in lines
    assert f"Triton's compiled kernels and autotuner results: {tmp_path / 'triton'} (kept across runs)" in lines
    assert "config: mixed_precision = auto -> no here" in lines  # fp32 on the CPU
    plan = next(line for line in lines if line.startswith("memory plan: "))
    assert "tiny-sdxl 128px batch 4 rank 8, bf16" in plan  # the GPU it would train on: bf16 under auto
    assert not (tmp_path / "cache").exists()  # nothing judged, nothing written


def test_doctor_names_a_gpus_capability_shared_memory_and_formats(monkeypatch):
    props = SimpleNamespace(name="NVIDIA GeForce RTX 3080", major=8, minor=6, shared_memory_per_block_optin=101376,
                            total_memory=10 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
    device._gpu.cache_clear()
    try:
        lines = doctor.describe_device(torch.device("cuda", 0))
    finally:
        device._gpu.cache_clear()
    assert lines == ["device: NVIDIA GeForce RTX 3080, compute capability 8.6 (sm_86), 10.0 GiB",
                     "shared memory per block: 101376 B (99 KiB); bf16: yes; fp8 (e4m3) weights: no, sm_89 and up"]
