"""Run the benchmark suite and write benchmarks/results/<device>-<date>.json plus a markdown summary.

    python -m benchmarks.run            # from the repository root; extra args go to pytest (-k attention)
"""
import datetime
import json
import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks import harness

HERE = Path(__file__).resolve().parent
BASELINES = ("torch-sdpa", "torch-matmuls", "torch-adamw-fused", "torch-reference")  # what each op's speed-up is measured against


def summary(rows: list) -> str:
    """Markdown table: each row's time and throughput, and its speed-up over its op's torch baseline (BASELINES)."""
    baseline = {r["case"]: r["ms"] for r in rows if r["impl"] in BASELINES}
    lines = ["| op | case | impl | dtype | ms | TFLOP/s or GB/s | ceiling | vs torch |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = r.get("tflops", r.get("gbs"))
        peak = r.get("tflops_ceiling", r.get("gbs_ceiling"))
        base = baseline.get(r["case"])
        speedup = f"{base / r['ms']:.2f}x" if base else "-"
        lines.append(f"| {r['op']} | {r['case']} | {r['impl']} | {r['dtype']} | {r['ms']:.3f} | {rate} | {peak or '-'} | {speedup} |")
    return "\n".join(lines)


def main(argv: list) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        code = pytest.main([str(HERE), "-q", "-p", "no:cacheprovider", f"--benchmark-json={raw}", *argv])
        if not raw.exists():
            return code or 1
        rows = [b["extra_info"] for b in json.loads(raw.read_text())["benchmarks"]]
    for r in rows:
        r.pop("env", None)
    env = harness.environment()
    date = datetime.date.today().isoformat()
    out = HERE / "results" / f"{harness.device_slug()}-{date}.json"
    out.parent.mkdir(exist_ok=True)
    note = None if harness.on_gpu() else "CPU smoke test: references only, small shapes; not GPU figures"
    out.write_text(json.dumps(dict(env=env, note=note, rows=rows), indent=1) + "\n")
    print(f"\n{len(rows)} rows -> {out.relative_to(HERE.parent)}\n")
    print(summary(rows))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
