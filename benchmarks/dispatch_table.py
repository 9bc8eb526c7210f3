"""Write kernels/dispatch_table.json from measurements on this GPU: for every LoRA-linear and attention shape that
one SDXL step dispatches, the Triton kernel and the reference path are each timed forward + backward
(triton.testing.do_bench median, fresh random inputs of the real shape and dtype), and the faster one is recorded
with both times. `auto` dispatch then never runs a kernel where it measured slower (kernels/dispatch.py).

    python -m benchmarks.dispatch_table [--model sdxl --resolution 1024 --batch 1 --rank 16] [--budget-s 60]

Only a CUDA GPU writes entries: on a CPU the command says so and writes nothing, since a table entry must be a
measurement. The table is rewritten after every shape, so a run cut short keeps what it measured; entries of other
devices, and this device's shapes not measured this time, are kept.
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import triton.testing

from gesso.engine.io import write_bytes_atomic
from gesso.engine.measure import bench, harness
from gesso.kernels import dispatch
from gesso.kernels.attention import attention
from gesso.kernels.lora_linear import FP8_MIN_CAPABILITY, lora_linear

DTYPES = {str(d).removeprefix("torch."): d for d in (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)}


def dispatched_shapes(case: bench.Case, device: torch.device, dtype: torch.dtype) -> set:
    """(op, shape key) of every table-keyed call in one forward of `case`'s model (the backward has the same shapes)."""
    unet, network = bench.build(case, device, dtype)
    b = bench.make_batch(case, 0, device, dtype)
    with torch.no_grad(), dispatch.recorded() as seen, dispatch.forced("auto"):
        unet(b.noisy, b.t, b.context, b.y)
    del unet, network, b
    bench.release(device)
    return seen


def lora_linear_call(key: str, device: torch.device):
    """fwd + bwd of lora_linear at key "M-N-K-R-xdtype-wdtype", on fresh random inputs."""
    m, n, k, r, x_dtype, w_dtype = key.split("-")
    m, n, k, r, dtype = int(m), int(n), int(k), int(r), DTYPES[x_dtype]
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(n, k, device=device) / k**0.5
    scale = None
    if DTYPES[w_dtype] == torch.float8_e4m3fn:
        scale = w.abs().amax(dim=1) / 448.0  # per channel, as engine.memory.fp8 stores them
        w = (w / scale[:, None]).to(torch.float8_e4m3fn)
    else:
        w = w.to(dtype)
    down = (torch.randn(r, k, device=device) / k**0.5).to(dtype).requires_grad_()
    up = (torch.randn(n, r, device=device) / r**0.5).to(dtype).requires_grad_()
    dy = torch.randn(m, n, device=device, dtype=dtype)
    return lambda: lora_linear(x, w, None, down, up, 1.0, weight_scale=scale).backward(dy)


def attention_call(key: str, device: torch.device):
    """fwd + bwd of attention at key "B-H-Tq-D-Tk-dtype"."""
    b, h, tq, d, tk, name = key.split("-")
    b, h, tq, d, tk, dtype = int(b), int(h), int(tq), int(d), int(tk), DTYPES[name]
    q = torch.randn(b, h, tq, d, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, h, tk, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    do = torch.randn(b, h, tq, d, device=device, dtype=dtype)
    return lambda: attention(q, k, v).backward(do)


CALLS = {"lora_linear": lora_linear_call, "attention": attention_call}


def median_ms(fn) -> float:
    ms = triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=[0.5])
    return ms[0] if isinstance(ms, list) else ms


def measure(op: str, key: str, device: torch.device) -> dict:
    fn = CALLS[op](key, device)
    with dispatch.forced("triton"):
        triton_ms = median_ms(fn)  # the first call autotunes: do_bench's warm-up absorbs it
    with dispatch.forced("reference"):
        reference_ms = median_ms(fn)
    return dict(use="reference" if reference_ms < triton_ms else "triton", triton_ms=round(triton_ms, 5),
                reference_ms=round(reference_ms, 5))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dispatch_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sdxl")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--budget-s", type=float, default=60.0, help="stop starting new shapes after this many seconds")
    p.add_argument("--out", default=str(dispatch.TABLE))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: no dispatch table written (its entries must be measured on the GPU they are for)")
        return 0
    start, device = time.monotonic(), torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    fp8 = torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY
    shapes = set()
    for fp8_base in (False, True) if fp8 else (False,):
        shapes |= dispatched_shapes(bench.Case(args.model, args.resolution, args.batch, args.rank, fp8_base), device,
                                    torch.bfloat16)
    out = Path(args.out)
    table = json.loads(out.read_text()) if out.is_file() else {"devices": {}}
    env = harness.environment()
    entry = table["devices"].setdefault(name, {"measured": {}, "ops": {}})
    entry["measured"] = dict(date=datetime.date.today().isoformat(), torch=env["torch"], triton=env["triton"],
                             git=env["git"], shapes_from=f"{args.model} {args.resolution}px b{args.batch} r{args.rank}",
                             timing="triton.testing.do_bench median of forward + backward, random inputs")
    done = 0
    for op, key in sorted(shapes):
        if time.monotonic() - start > args.budget_s:
            print(f"budget spent: {len(shapes) - done} of {len(shapes)} shapes not measured")
            break
        row = measure(op, key, device)
        entry["ops"].setdefault(op, {})[key] = row
        write_bytes_atomic(out, (json.dumps(table, indent=1, sort_keys=True) + "\n").encode())
        done += 1
        print(f"{op} {key}: triton {row['triton_ms']:.4f} ms, reference {row['reference_ms']:.4f} ms -> {row['use']}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
