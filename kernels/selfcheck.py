"""First use on a GPU: each kernel the run will take, checked against its reference before training.

At small shapes (ragged edges, fresh random inputs) and in the run's dtypes, the LoRA linear (forward and the three
gradients), attention (forward and dq, dk, dv, per padded head dim the model has) and the 8-bit AdamW step run
beside their references. A result within the parity tolerance of tests/kernels (max |kernel - ref64| <= 2 x max
|torch low precision - ref64| + one ulp of the largest value) records the kernel as "triton"; one beyond it, or a
Triton error, turns the kernel off for its dtype and shape class with one line (kernels/fallback.py). Verdicts are
cached per GPU, driver, Triton and Gesso version, so later runs skip the check. Only `auto` dispatch on a CUDA
device checks anything: GESSO_KERNELS forces either path, and fp32 matmuls take cuBLAS without asking.

The first run on a GPU says "compiling kernels for <GPU> (first run only)" and shows the check's progress; while
that run compiles more (the autotuner's tiles at the real shapes, at its first step), a line every few seconds
counts them. Triton keeps what it compiled and the tuner's choices in its cache folder across runs.
"""
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm
from triton import knobs
from triton.errors import TritonError

from gesso.kernels import attention as attn
from gesso.kernels import fallback
from gesso.kernels import lora_linear as lin
from gesso.kernels.adamw8bit import AdamW8bit, adamw8bit_ref, adamw8bit_step
from gesso.kernels.dispatch import forced, kernel_mode, use_triton

NOTE_EVERY_S = 10.0
FP8 = torch.float8_e4m3fn


@dataclass
class Check:
    op: str
    cls: str
    run: object  # () -> (agrees: bool, how: str)


def agreement(name: str, out: torch.Tensor, ref64: torch.Tensor, lowprec: torch.Tensor) -> tuple[bool, str]:
    """tests/kernels' parity rule for one output; fp32 outputs: within 1e-5 of the largest reference value."""
    scale = ref64.abs().max().item()
    err = (out.double() - ref64).abs().max().item()
    if out.dtype == torch.float32:
        tol = 1e-5 * scale
    else:
        tol = 2 * (lowprec.double() - ref64).abs().max().item() + torch.finfo(out.dtype).eps * scale
    ok = bool(torch.isfinite(out).all()) and err <= tol
    return ok, f"{name} max err {err:.3g} {'<=' if ok else '>'} {tol:.3g}"


def _verdict(results: list[tuple[bool, str]]) -> tuple[bool, str]:
    failed = [how for ok, how in results if not ok]
    return (not failed, "; ".join(failed) if failed else f"agrees with its reference ({results[0][1]}, ...)")


def lora_check(device, dtype, fp8: bool, rank: int) -> tuple[bool, str]:
    g = torch.Generator(device).manual_seed(0)
    x64 = torch.randn(2, 75, 96, device=device, generator=g, dtype=torch.float64)  # 150 rows, 96 in: ragged tiles
    w64 = torch.randn(80, 96, device=device, generator=g, dtype=torch.float64) / 96**0.5
    scale = None
    if fp8:
        scale = w64.abs().amax(1) / 448  # per output channel, as train.fp8_base quantises
        w64 = (w64 / scale[:, None]).to(FP8).double() * scale[:, None]
    down64 = torch.randn(rank, 96, device=device, generator=g, dtype=torch.float64) / 96**0.5
    up64 = torch.randn(80, rank, device=device, generator=g, dtype=torch.float64) / rank**0.5
    b64 = torch.randn(80, device=device, generator=g, dtype=torch.float64)
    dy64 = torch.randn(2, 75, 80, device=device, generator=g, dtype=torch.float64)

    def grads(x, w, b, down, up, dy, path, weight_scale=None):
        x, down, up = (t.detach().requires_grad_() for t in (x, down, up))
        with forced(path):  # the backward too: forced "triton" lets a kernel's error reach the caller
            y = lin.lora_linear(x, w, b, down, up, 0.5, weight_scale=weight_scale)
            return (y, *torch.autograd.grad(y, (x, down, up), dy))

    ref = grads(x64, w64, b64, down64, up64, dy64, "reference")
    low = [t.to(dtype) for t in (x64, w64, b64, down64, up64, dy64)]
    torch_low = grads(*low, "reference")
    w_kernel = (w64 / scale[:, None]).to(FP8) if fp8 else low[1]
    kernel = grads(low[0], w_kernel, *low[2:], "triton", weight_scale=scale.float() if fp8 else None)
    names = ("y", "dx", "d_down", "d_up")
    return _verdict([agreement(n, k, r, t) for n, k, r, t in zip(names, kernel, ref, torch_low)])


def attention_check(device, dtype, head_dim: int) -> tuple[bool, str]:
    g = torch.Generator(device).manual_seed(0)
    q64, k64, v64, do64 = (torch.randn(1, 2, t, head_dim, device=device, generator=g, dtype=torch.float64)
                           for t in (90, 77, 77, 90))  # 90 queries over 77 keys: ragged in both

    def grads(q, k, v, do, fn):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        with forced("triton"):  # the kernel's backward raises its errors instead of giving way (kernels/fallback.py)
            o = fn(q, k, v)
            return (o, *torch.autograd.grad(o, (q, k, v), do))

    ref = grads(q64, k64, v64, do64, attn.attention_ref)
    low = [t.to(dtype) for t in (q64, k64, v64, do64)]
    torch_low = grads(*low, lambda q, k, v: attn.attention_ref(q, k, v, upcast=False))
    kernel = grads(*low, attn.FlashAttentionFunction.apply)
    return _verdict([agreement(n, *r) for n, *r in zip(("o", "dq", "dk", "dv"), kernel, ref, torch_low)])


def adamw8bit_check(device) -> tuple[bool, str]:
    g = torch.Generator(device).manual_seed(0)
    p = torch.randn(65, 67, device=device, generator=g)  # 4355 elements: 18 blocks, the last one ragged
    grad = torch.randn(65, 67, device=device, generator=g)
    state = {}
    AdamW8bit([p])._init_state(p, state, 0)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, step=1)
    p_ref, state_ref = p.clone(), {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
    adamw8bit_step(p, grad, state, **hp)
    adamw8bit_ref(p_ref, grad, state_ref, **hp)
    err = (p - p_ref).abs().max().item()
    codes = max((state[k].int() - state_ref[k].int()).abs().max().item() for k in ("m_code", "v_code"))
    ok = err <= 2 * torch.finfo(torch.float32).eps * p_ref.abs().max().item() + 1e-6 and codes <= 1
    return ok, f"p max err {err:.3g}, codes at most {codes} apart (tolerance: 2 ulp + 1e-6, one code)"


def planned(device, dtype, fp8_base: bool, adamw8bit: bool, rank: int, head_dims) -> list[Check]:
    """The checks of the kernels `auto` would send this run's tensors to."""
    probe = torch.empty(1, device=device, dtype=dtype)
    checks = []
    if use_triton(probe, op="lora_linear"):
        checks.append(Check("lora_linear", lin.shape_class(dtype, dtype, rank), lambda: lora_check(device, dtype, False, rank)))
    if fp8_base and use_triton(probe, min_capability=lin.FP8_MIN_CAPABILITY, op="lora_linear"):
        checks.append(Check("lora_linear", lin.shape_class(dtype, FP8, rank), lambda: lora_check(device, dtype, True, rank)))
    if use_triton(probe, op="attention"):
        classes = {attn.shape_class(dtype, d): d for d in sorted(head_dims, reverse=True) if d <= attn.MAX_HEAD_DIM}
        for cls, d in sorted(classes.items(), key=lambda item: item[1]):  # the smallest head dim of each padded class
            checks.append(Check("attention", cls, lambda d=d: attention_check(device, dtype, d)))
    if adamw8bit and use_triton(torch.empty(1, device=device), op="adamw8bit"):
        checks.append(Check("adamw8bit", "float32", lambda: adamw8bit_check(device)))
    return checks


def preflight(device: torch.device, dtype: torch.dtype, *, fp8_base: bool, adamw8bit: bool, rank: int,
              head_dims=(64,), progress: bool = True) -> None:
    """Check, before training, the kernels this run will use that this GPU has no verdict for (module docstring)."""
    store = fallback.verdicts(device) if kernel_mode() == "auto" else None
    if store is None:
        return
    todo = [c for c in planned(device, dtype, fp8_base, adamw8bit, rank, head_dims) if store.use(c.op, c.cls) is None]
    if not todo:
        return
    title = f"compiling kernels for {store.gpu.name} (first run only)"
    if not store.found:
        count_compiles(title)
    for check in tqdm(todo, desc=title, unit="kernel", disable=not progress):
        try:
            agrees, how = check.run()
        except TritonError as e:
            fallback.give_way(check.op, check.cls, device, fallback.describe(e))
            continue
        if agrees:
            store.record(check.op, check.cls, "triton", how)
        else:
            fallback.give_way(check.op, check.cls, device, f"disagrees with its reference: {how}")


def count_compiles(title: str) -> None:
    """For the rest of this process, a line every NOTE_EVERY_S seconds while Triton compiles (chaining any hook)."""
    before = knobs.runtime.jit_post_compile_hook
    seen = {"count": 0, "noted": 0.0}

    def hook(*args, **kwargs):
        seen["count"] += 1
        now = time.monotonic()
        if now - seen["noted"] >= NOTE_EVERY_S:
            seen["noted"] = now
            name = getattr(kwargs.get("fn"), "name", "a kernel")
            tqdm.write(f"{title}: {seen['count']} compiled so far ({name})", file=sys.stdout)
        return before(*args, **kwargs) if before else None

    knobs.runtime.jit_post_compile_hook = hook
