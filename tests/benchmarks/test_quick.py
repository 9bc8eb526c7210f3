"""The GPU session's `quick` stage, dry-run on the CPU at tiny sizes: its driver's arguments and results file, the
diffusers + PEFT peer's construction and module set, the summary, the dispatch table writer, and the shell plan."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

from benchmarks import dispatch_table, quick, summary
from gesso import models
from gesso.engine.lora import names
from gesso.engine.lora import network as lora
from gesso.engine.measure import bench, peer
from gesso.kernels.dispatch import forced

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "tiny-sdxl", "--resolution", "64", "--rank", "4"]


@pytest.mark.slow
def test_driver_writes_every_system_and_the_summary(tmp_path):
    raw, predictions, final = tmp_path / "raw.json", tmp_path / "pred.json", tmp_path / "quick.json"
    rows = ["rows", "--results", str(raw), "--steps", "2", "--warmup", "0", *TINY]
    assert quick.main([*rows, "--systems", "engine,peer", "--modes", "bf16-ckpt"]) == 0
    graph = quick.main([*rows, "--systems", "graph", "--modes", "bf16-ckpt"])
    assert quick.main(["loss", "--results", str(raw), "--steps", "2", *TINY]) == 0
    assert quick.main(["predict", "--out", str(predictions), "--cpu-sizes", "--modes", "bf16-ckpt", *TINY]) == 0
    assert summary.main(["--results", str(raw), "--predictions", str(predictions), "--out", str(final)]) == 0

    results = json.loads(raw.read_text())
    assert results["env"]["torch"] == torch.__version__ and results["env"]["git"]
    measured = {r["system"]: r for r in results["rows"] if "error" not in r}
    expected = {"engine-kernels", "engine-reference", "diffusers-peft"}
    if torch.cuda.is_available():
        expected.add("engine-kernels-cudagraph")
    else:  # capture needs CUDA: the row says why, the step exits 1, nothing else is lost
        assert graph == 1
        (failure,) = [r for r in results["rows"] if "error" in r]
        assert failure["system"] == "graph" and "needs a CUDA GPU" in failure["error"]
    assert set(measured) == expected
    modules = len(names.attention_targets(names.meta_unet(models.configs.get("tiny-sdxl").unet)))
    for r in measured.values():
        assert r["seconds_per_step"] > 0 and r["tflop_per_step"] > 0 and r["lora_modules"] == modules, r
        assert (r["model"], r["resolution"], r["batch"], r["rank"], r["steps"]) == ("tiny-sdxl", 64, 1, 4, 2)
    # the peer counts its own FLOPs: the same model, so within a few percent of the engine's (norms, casts differ)
    ratio = measured["diffusers-peft"]["tflop_per_step"] / measured["engine-reference"]["tflop_per_step"]
    assert 0.9 < ratio < 1.1, ratio
    (check,) = results["loss_checks"]
    assert check["passed"] and len(check["kernels"]) == 2

    merged = json.loads(final.read_text())
    by_system = {r["system"]: r for r in merged["rows"]}
    assert by_system["engine-kernels"]["predicted_peak_gib"] > 0
    assert by_system["engine-reference"]["predicted_peak_gib"] > 0
    assert by_system["diffusers-peft"]["predicted_peak_gib"] is None  # another model: the predictor says nothing
    (ratios,) = merged["ratios"]
    assert ratios["kernels_over_reference"] == pytest.approx(
        by_system["engine-reference"]["seconds_per_step"] / by_system["engine-kernels"]["seconds_per_step"])
    assert ratios["kernels_over_diffusers"] == pytest.approx(
        by_system["diffusers-peft"]["seconds_per_step"] / by_system["engine-kernels"]["seconds_per_step"])


@pytest.mark.parametrize("error", [CompilationError(None, None, "step is already defined"), PTXASError("ptxas error"),
                                   OutOfResources(102400, 101376, "shared memory")], ids=type)
@pytest.mark.slow
def test_a_row_that_raises_leaves_the_rows_measured_before_it(error, tmp_path, monkeypatch):
    raw = tmp_path / "raw.json"
    real = bench.time_path
    seen_before = []

    def time_path(path, *args, **kwargs):
        if path == "kernels":  # the reference row must already be in the file when the kernels path starts
            seen_before.extend(r["system"] for r in json.loads(raw.read_text())["rows"])
            raise error
        return real(path, *args, **kwargs)

    monkeypatch.setattr(bench, "time_path", time_path)
    rows = ["rows", "--results", str(raw), "--steps", "1", "--warmup", "0", *TINY, "--modes", "bf16-ckpt"]
    assert quick.main([*rows, "--systems", "engine,peer"]) == 1
    assert seen_before == ["engine-reference"]
    kept = json.loads(raw.read_text())["rows"]
    assert [r["system"] for r in kept] == ["engine-reference", "engine-kernels", "diffusers-peft"]
    assert kept[0]["seconds_per_step"] > 0 and kept[2]["seconds_per_step"] > 0  # measured before and after the failure
    assert kept[1]["error"].startswith(type(error).__name__)


def test_peer_computes_the_engines_function_on_the_same_modules():
    case = bench.Case("tiny-sdxl", 64, 1, 4)
    unet, network = bench.build(case, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for m in network.modules.values():
            m.lora_up.normal_(0, 0.1)  # a LoRA that changes the output, so the copy into PEFT is checked too
    p = peer.build_peer(unet, network, gradient_checkpointing=True)
    to_diffusers = names.original_to_diffusers_paths(unet.cfg)
    assert sorted(peer.lora_layers(p)) == sorted(to_diffusers[path] for _, path, _ in network.paths.values())
    inputs = peer.make_inputs(case, 3, torch.device("cpu"), torch.float32)
    b = inputs.batch
    with torch.no_grad(), forced("reference"):
        ours = unet(b.noisy, b.t, b.context, b.y)
        theirs = peer.forward(p, inputs)
    assert ((ours - theirs).abs().max() / ours.abs().max()).item() < 1e-5
    assert all(q.dtype == torch.float32 and q.requires_grad for q in p.lora_params)
    assert len(p.lora_params) == 2 * len(network.modules)


@pytest.mark.slow
def test_full_size_peer_carries_lora_on_kohyas_722_modules():
    # built on the meta device: no memory, the module set of the real SDXL UNet
    with torch.device("meta"):
        unet = models.unet.UNet(models.configs.get("sdxl").unet).requires_grad_(False)
    network = lora.inject(unet, names.attention_targets(unet), "lora_unet_", 16, 16)
    p = peer.build_peer(unet, network, gradient_checkpointing=True)
    layers = peer.lora_layers(p)
    assert len(layers) == len(network.modules) == 722
    assert sorted(layers) == sorted(p.targets)


def test_dispatch_table_is_never_written_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("on a GPU this command measures; the CPU refusal is what CI checks")
    out = tmp_path / "table.json"
    assert dispatch_table.main(["--out", str(out)]) == 0
    assert not out.exists() and "no dispatch table written" in capsys.readouterr().out


@pytest.mark.slow
def test_shell_plan_runs_the_issues_order_inside_the_budget(tmp_path):
    env = dict(os.environ, QUICK_PLAN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", "quick"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plan = [line for line in done.stdout.splitlines() if line.startswith("plan ")]
    limits = [int(line.split()[1]) for line in plan]
    assert sum(limits) <= 540
    order = ["tests/kernels", "compile_targets --warm", "--systems engine --modes bf16-ckpt",
             "--systems engine --modes fp8-ckpt", "--systems peer", "--systems graph", "benchmarks.quick loss",
             "benchmarks.dispatch_table", "benchmarks.summary"]  # batch 4 and 512 px: where time is left
    positions = [next(i for i, line in enumerate(plan) if step in line) for step in order]
    assert positions == sorted(positions), plan
    assert "GESSO_KERNELS=triton" in plan[0]
    # the parity tests, spread over workers where the machine has pytest-xdist
    assert re.search(r"-m pytest -q -p no:cacheprovider (-n \d+ )?tests/kernels$", plan[0]), plan[0]
