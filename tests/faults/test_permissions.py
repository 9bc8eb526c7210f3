"""File permissions: every file a run writes gets the user's umask (0644 under 022, so a ComfyUI or AUTOMATIC1111
running as another user, in Docker say, can read the LoRA), never the 0600 of a bare temporary file."""
import os
import stat
from pathlib import Path

import pytest
from faults_testutil import DEMO, gesso_cli

from gesso.engine.io import current_umask, write_bytes_atomic

KINDS = {  # every kind of file a run writes: (folder, pattern)
    "epoch LoRA": ("run", "demo-000001.safetensors"), "final LoRA": ("run", "demo.safetensors"),
    "state": ("run", "state.pt"), "metrics": ("run", "metrics.jsonl"), "preview": ("run", "samples/demo-e000001-00.png"),
    "tensorboard": ("run", "tensorboard/events.out.tfevents.*"), "latent cache": ("cache", "latents/*.safetensors"),
    "text cache": ("cache", "text/*.safetensors"), "manifest": ("run", "gesso-run.json"),
}


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_a_run_writes_has_the_umasks_mode(tmp_path, umask, mode):
    overrides = ["train.epochs=1", "dataset.repeats=1", "dataset.resolution=64", "sample.steps=4", "sample.every_n_epochs=1",
                 "output.tensorboard=true", f"dataset.cache_dir='{tmp_path / 'cache'}'"]
    proc = gesso_cli("train", DEMO, "--output-dir", tmp_path / "run", *[a for s in overrides for a in ("--set", s)],
                     preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind, (folder, pattern) in KINDS.items():
        assert list((tmp_path / folder).glob(pattern)), f"the run wrote no {kind} file ({pattern})"
    written = modes(tmp_path / "run") | {f"cache/{k}": v for k, v in modes(tmp_path / "cache").items()}
    assert {name: oct(m) for name, m in written.items() if m != mode} == {}


def test_an_atomic_write_takes_the_umask_read_without_changing_it(tmp_path):
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        write_bytes_atomic(tmp_path / "a.bin", b"data")
        assert os.umask(0o027) == 0o027  # still the process's umask after the write
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o640
