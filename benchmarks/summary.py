"""The `quick` stage's last step: the rows beside the predictor's peaks, the speed ratios, one table.

    python -m benchmarks.summary --results R.json --predictions P.json --out FINAL.json [--extra swap8=F.json]

`--extra LABEL=FILE` adds the rows of a `gesso bench --out FILE` run (the block-swap rows), as system
`engine-<path>-LABEL`. Ratios compare rows of the same model, size, batch, rank and base weights:
kernels/reference = reference s/step over kernels s/step, kernels/diffusers = diffusers + PEFT s/step over
kernels s/step (above 1: the kernels are faster). Measured peak over predicted: torch.cuda.max_memory_allocated
over the predictor's peak for the same case and optimizer.
"""
import argparse
import json
import sys
from pathlib import Path

from gesso.engine.io import write_bytes_atomic

OPTIMIZER_NAMES = {"AdamW8bit": "adamw8bit", "torch.optim.AdamW": "adamw"}  # bench's row names -> train.optimizer


def parser() -> argparse.ArgumentParser:
    s = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.split("\n\n")[0])
    s.add_argument("--results", required=True)
    s.add_argument("--predictions", help="the predict step's file; rows keep no prediction without it")
    s.add_argument("--out", required=True, help="the merged results file")
    s.add_argument("--markdown", help="also write the table here")
    s.add_argument("--extra", action="append", default=[], metavar="LABEL=FILE")
    return s


def _case(r: dict) -> tuple:
    return (r["model"], r["resolution"], r["batch"], r["rank"], r["base_weights"], r["gradient_checkpointing"])


def prediction_key(model, resolution, batch, rank, base_weights, checkpointing, optimizer) -> str:
    """One prediction's name in predictions.json; `optimizer` as train.optimizer spells it."""
    return f"{model}-{resolution}px-b{batch}-r{rank}-{base_weights}-{'ckpt' if checkpointing else 'nockpt'}-{optimizer}"


def _row_prediction_key(r: dict) -> str:
    return prediction_key(r["model"], r["resolution"], r["batch"], r["rank"], r["base_weights"],
                          r["gradient_checkpointing"], OPTIMIZER_NAMES.get(r["optimizer"], r["optimizer"]))


def extra_rows(label: str, path: Path, peak_tflops: float | None) -> list[dict]:
    """`gesso bench` rows, their MFU against the measured matmul peak (gesso bench uses the datasheet's)."""
    rows = []
    for r in json.loads(path.read_text())["rows"]:
        mfu = r["tflop_per_step"] / r["seconds_per_step"] / peak_tflops if peak_tflops else None
        rows.append(dict(r, system=f"engine-{r['path']}-{label}", mfu=mfu, lora_modules=None))
    return rows


def merge(results: dict, predictions: dict, extras: list[tuple[str, Path]]) -> dict:
    rows = [r for r in results["rows"] if "error" not in r]
    peak = (results.get("peak") or {}).get("bf16_matmul_tflops")
    for label, path in extras:
        rows += extra_rows(label, path, peak)
    by_case: dict = {}
    for r in rows:
        predicted = predictions.get(_row_prediction_key(r)) if r["system"] != "diffusers-peft" else None
        r["predicted_peak_gib"] = predicted
        r["measured_over_predicted"] = (r["peak_allocated_gib"] / predicted
                                        if predicted and r.get("peak_allocated_gib") is not None else None)
        by_case.setdefault(_case(r), {})[r["system"]] = r
    ratios = []
    for case, systems in by_case.items():
        kernels = systems.get("engine-kernels")
        if kernels is None:
            continue
        ref, diffusers = systems.get("engine-reference"), systems.get("diffusers-peft")
        ratios.append(dict(case=dict(zip(("model", "resolution", "batch", "rank", "base_weights",
                                          "gradient_checkpointing"), case)),
                           kernels_over_reference=ref["seconds_per_step"] / kernels["seconds_per_step"] if ref else None,
                           kernels_over_diffusers=(diffusers["seconds_per_step"] / kernels["seconds_per_step"]
                                                   if diffusers else None)))
    failures = [r for r in results["rows"] if "error" in r]
    return dict(results, rows=rows, failed_rows=failures, ratios=ratios)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(merged: dict) -> str:
    env = merged["env"]
    peak = (merged.get("peak") or {}).get("bf16_matmul_tflops")
    lines = [f"{env['device']}, driver {env.get('driver') or '-'}, torch {env['torch']}, triton {env['triton']}, "
             f"git {env['git']}, {env['date']}; measured bf16 matmul peak {_fmt(peak, '.0f')} TFLOP/s", "",
             "| system | res | batch | rank | base | ckpt | s/step | MFU | alloc GiB | reserved GiB | predicted GiB | alloc/pred |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in merged["rows"]:
        lines.append(f"| {r['system']} | {r['resolution']} | {r['batch']} | {r['rank']} | {r['base_weights']} | "
                     f"{'yes' if r['gradient_checkpointing'] else 'no'} | {r['seconds_per_step']:.4f} | "
                     f"{_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('peak_allocated_gib'), '.2f')} | "
                     f"{_fmt(r.get('peak_reserved_gib'), '.2f')} | {_fmt(r.get('predicted_peak_gib'), '.2f')} | "
                     f"{_fmt(r.get('measured_over_predicted'), '.2f')} |")
    lines += ["", "| case | kernels/reference | kernels/diffusers+PEFT |", "|---|---|---|"]
    for q in merged["ratios"]:
        c = q["case"]
        lines.append(f"| {c['model']} {c['resolution']}px b{c['batch']} r{c['rank']} {c['base_weights']}"
                     f"{' ckpt' if c['gradient_checkpointing'] else ''} | {_fmt(q['kernels_over_reference'], '.2f')} | "
                     f"{_fmt(q['kernels_over_diffusers'], '.2f')} |")
    for c in merged.get("loss_checks", []):
        lines.append(f"\nloss check {c['resolution']}px b{c['batch']} {c['base_weights']}: max rel diff "
                     f"{c['max_rel_diff']:.2e} (tolerance {c['tolerance']:g}), update rel diff {c['update_rel_diff']:.2e} "
                     f"-> {'pass' if c['passed'] else 'FAIL'}")
    for f in merged["failed_rows"]:
        lines.append(f"\nFAILED {f['system']} {f.get('mode')}: {f['error'][:300]}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if not Path(args.results).is_file():
        print(f"! no {args.results}: no step measured anything")
        return 1
    results = json.loads(Path(args.results).read_text())
    predictions = json.loads(Path(args.predictions).read_text()) if args.predictions and Path(args.predictions).is_file() else {}
    extras = []
    for item in args.extra:
        label, _, file = item.partition("=")
        if Path(file).is_file():
            extras.append((label, Path(file)))
        else:
            print(f"! no {file}: rows {label} left out")
    merged = merge(results, predictions, extras)
    text = table(merged)
    print(text)
    write_bytes_atomic(args.out, (json.dumps(merged, indent=1) + "\n").encode())
    if args.markdown:
        write_bytes_atomic(args.markdown, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
