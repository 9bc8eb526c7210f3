"""`gesso bench` on a machine without a GPU: tiny runs that say their numbers are CPU numbers, the FLOP count
behind MFU, the issue's matrix of rows, and the loss check of the kernels path against the reference path."""
import contextlib
import json
from unittest import mock

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gesso import cli, models
from gesso.engine.lora import network as lora
from gesso.engine.measure import bench
from gesso.kernels.lora_linear import lora_linear as real_lora_linear

CPU = torch.device("cpu")


@pytest.mark.slow
def test_bench_without_gpu_reports_both_paths_as_cpu_numbers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--resolution", "64", "--rank", "4", "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CPU numbers" in printed and "reference / kernels time" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["path"] for r in rows] == ["kernels", "reference"]
    assert all(r["device"] == "cpu" and r["model"] == "tiny-sdxl" and r["mfu"] is None for r in rows)
    assert all(r["seconds_per_step"] > 0 and r["images_per_s"] == 1 / r["seconds_per_step"] for r in rows)
    # both rows carry the reference path's count: FlopCounterMode cannot see Triton kernels
    kernels, reference = rows
    assert kernels["tflop_per_step"] == reference["tflop_per_step"] > kernels["forward_tflop"] > 0
    assert kernels["reference_over_kernels"] == reference["seconds_per_step"] / kernels["seconds_per_step"]


@pytest.mark.parametrize("resolution, batch", [
    (64, 1),  # minimal
    (96, 2),  # odd latent side at the lowest level (3 x 3), batch 2
])
def test_flop_count_of_a_forward_equals_the_formula(resolution, batch):
    cfg = models.configs.get("tiny-sdxl")
    case = bench.Case("tiny-sdxl", resolution, batch, rank=4)
    unet, network = bench.build(case, CPU, torch.float32)
    network.remove()  # the formula is the plain UNet's
    b = bench.make_batch(case, 0, CPU, torch.float32)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=bench.CPU_SDPA_FLOPS) as counter:
        unet(b.noisy, b.t, b.context, b.y)
    assert counter.get_total_flops() == bench.unet_forward_flops(cfg.unet, resolution, batch)


def test_formula_gives_the_documented_sdxl_forward():
    # /work/shared/REFERENCE.md, FlopCounterMode on the full-size UNet: 6.76 TFLOP at 1024^2, 3.64 at 768^2, 1.59 at 512^2
    sdxl = models.configs.get("sdxl").unet
    assert [round(bench.unet_forward_flops(sdxl, px, 1) / 1e12, 2) for px in (1024, 768, 512)] == [6.76, 3.64, 1.59]


@pytest.mark.slow
def test_matrix_on_cpu_has_every_case_for_both_paths(tmp_path, capsys):
    out = tmp_path / "matrix.json"
    assert cli.main(["bench", "--matrix", "--steps", "1", "--warmup", "0", "--out", str(out)]) == 0
    assert "CPU numbers" in capsys.readouterr().out
    result = json.loads(out.read_text())
    env = result["env"]
    assert env["device"].startswith("CPU") and env["torch"] == torch.__version__ and env["driver"] is None
    assert env["triton"] and env["git"] and env["date"] and "CPU numbers" in env["note"]
    rows, cases = result["rows"], {}
    for r in rows:
        key = (r["resolution"], r["batch"], r["rank"], r["base_weights"], r["gradient_checkpointing"])
        cases.setdefault(key, {})[r["path"]] = r
    grid = {(px, b, r, "float32", True) for px in (64, 32) for b in (1, 2) for r in (4, 8)}
    memory_modes = {(64, 1, 4, "float32", False), (64, 1, 4, "fp8-e4m3", True)}
    assert set(cases) == grid | memory_modes and len(rows) == 2 * len(cases)
    assert all(set(pair) == {"kernels", "reference"} and pair["kernels"]["reference_over_kernels"] > 0 for pair in cases.values())
    assert all(r["model"] == "tiny-sdxl" and r["peak_allocated_gib"] is None for r in rows)
    tflop = {key: pair["reference"]["tflop_per_step"] for key, pair in cases.items()}
    assert tflop[(64, 2, 4, "float32", True)] == pytest.approx(2 * tflop[(64, 1, 4, "float32", True)], rel=1e-3)
    # checkpointing recomputes (most of) the forward in the backward, and the count includes it
    forward = cases[(64, 1, 4, "float32", True)]["reference"]["forward_tflop"]
    recomputed = tflop[(64, 1, 4, "float32", True)] - tflop[(64, 1, 4, "float32", False)]
    assert 0.5 * forward < recomputed <= forward


@pytest.mark.slow
def test_loss_check_on_cpu_passes_for_both_bases(tmp_path, capsys):
    out = tmp_path / "loss.json"
    argv = ["bench", "--loss-check", "3", "--resolution", "32", "--rank", "4", "--gradient-checkpointing", "--lr", "1e-3"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("-> pass") == 2
    result = json.loads(out.read_text())
    assert result["rows"] == []  # a loss check alone times nothing
    checks = result["loss_checks"]
    assert [c["base_weights"] for c in checks] == ["float32", "fp8-e4m3"]
    for c in checks:
        assert len(c["kernels"]) == len(c["reference"]) == len(c["no_update"]) == 3
        assert c["tolerance"] == 1e-4 and c["max_rel_diff"] <= c["tolerance"] and c["update_rel_diff"] <= 1e-3
        assert c["losses_agree"] and c["updates_agree"] and c["passed"]
        assert c["kernels"][0] == c["no_update"][0]  # same start: the first loss comes before any update
        assert c["sensitive"]  # 3 steps at lr 1e-3 move the loss by more than the tolerance


@pytest.mark.slow
def test_loss_check_fails_when_the_kernels_path_does_not_train(monkeypatch, tmp_path, capsys):
    real = bench.kernel_path
    # a LoRA linear whose up-projection gets no gradient: the LoRA never trains
    untrained = lambda x, w, b, down, up, scale, **kw: real_lora_linear(x, w, b, down, up.detach(), scale, **kw)  # noqa: E731

    @contextlib.contextmanager
    def broken(path):
        with real(path), mock.patch.object(lora, "lora_linear", untrained) if path == "kernels" else contextlib.nullcontext():
            yield

    monkeypatch.setattr(bench, "kernel_path", broken)
    out = tmp_path / "loss.json"
    argv = ["bench", "--loss-check", "3", "--resolution", "32", "--rank", "4", "--lr", "1e-3", "--out", str(out)]
    assert cli.main(argv) == 1
    assert capsys.readouterr().out.count("-> FAIL") == 2
    checks = json.loads(out.read_text())["loss_checks"]
    assert len(checks) == 2  # both bases' checks are in the file, so the loop below looks at something
    for c in checks:
        assert c["kernels"][0] == c["reference"][0]
        assert c["sensitive"] and not c["losses_agree"] and c["max_rel_diff"] > c["tolerance"]
        assert not c["updates_agree"] and c["update_rel_diff"] > 0.9 and not c["passed"]
