"""`gesso bench` on a machine without a GPU: a tiny run that says its numbers are CPU numbers."""
import json

import cli


def test_bench_without_gpu_reports_both_paths_as_cpu_numbers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--resolution", "64", "--rank", "4", "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CPU numbers" in printed and "reference / kernels time" in printed
    rows = json.loads(out.read_text())
    assert [r["path"] for r in rows] == ["kernels", "reference"]
    assert all(r["device"] == "cpu" and r["model"] == "tiny-sdxl" and r["mfu"] is None for r in rows)
    assert all(r["seconds_per_step"] > 0 and r["images_per_s"] == 1 / r["seconds_per_step"] for r in rows)
    # both paths train the same model: the counted work agrees (attention is a small share of it)
    kernels, reference = (r["tflop_per_step"] for r in rows)
    assert kernels > 0 and abs(kernels - reference) / reference < 0.2
