"""Ahead-of-time compiles of the kernels' real launches for a GPU target, on a machine with no GPU or driver.

`launches` runs a host launcher (`lora_linear._forward`, `attention._backward`, `adamw8bit_step`, ...) on meta
tensors with every `_*_kernel` object of the kernel modules swapped for a recorder, so the arguments are exactly
those a GPU run passes. `variants` turns one launch into the configurations the autotuner may compile for it (its
shape pruning, kernels/tiles.py). `compile_one` compiles one of them with Triton's own compiler for an explicit
`GPUTarget`, through the JIT's own argument binder (16-byte alignment and divisibility by 16 specialised as a launch
would), with the ptxas Triton bundles, and returns the compiler's shared memory (`metadata.shared`), the
registers and spills ptxas reports (-v), the seconds, or the error. Workers of a process pool run `compile_one`:
its job holds plain values (a stand-in for each tensor), never a meta tensor.
"""
import contextlib
import io
import re
import sys
import time

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from gesso.kernels import adamw8bit, attention, lora_linear
from gesso.kernels.fallback import describe

MODULES = (lora_linear, attention, adamw8bit)


class _Recorder:
    def __init__(self, name: str, kernel, log: list):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, self.kernel, args, kwargs))


def launches(call) -> list[tuple]:
    """(kernel name, kernel object, args, kwargs) of every kernel launch `call()` makes; nothing is launched."""
    log, swapped = [], []
    try:
        for module in MODULES:
            for name, obj in list(vars(module).items()):
                if name.endswith("_kernel"):
                    swapped.append((module, name, obj))
                    setattr(module, name, _Recorder(name, obj, log))
        call()
    finally:
        for module, name, obj in swapped:
            setattr(module, name, obj)
    return log


def module_of(kernel) -> str:
    return next(m.__name__ for m in MODULES for obj in vars(m).values() if obj is kernel)


def jit_of(kernel):
    """The JITFunction under an autotuner (or the kernel itself)."""
    return kernel.fn if hasattr(kernel, "configs") else kernel


def variants(kernel, args: tuple, kwargs: dict) -> list[tuple]:
    """[(config or None, launch kwargs)]: each configuration the call's shape leaves to the tuner, or the launch."""
    if not hasattr(kernel, "configs"):
        return [(None, kwargs)]
    named = dict(zip(kernel.fn.arg_names, args))
    shaped = kernel.early_config_prune.shape(kernel.configs, named, **kwargs)
    return [(c, {**kwargs, **c.all_kwargs()}) for c in shaped]


def _pack(jit, arch: int, args: tuple, kwargs: dict) -> tuple:
    """(options, signature, constexprs, attrs) as `JITFunction.run` builds them on this target."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return jit._pack_args(backend, kwargs, bound, specialization, options)


def job_key(jit, arch: int, args: tuple, kwargs: dict) -> str:
    """Equal for two launches that compile to the same kernel on this target."""
    options, signature, constexprs, attrs = _pack(jit, arch, args, kwargs)
    return repr((jit.__name__, arch, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                 sorted(options.__dict__.items())))


class Aligned:
    """A tensor as the binder sees it: a dtype and a 16-byte aligned address (as CUDA allocations are)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 0


def job(kernel, arch: int, args: tuple, kwargs: dict) -> tuple:
    """A picklable compile job for `compile_one`."""
    plain = tuple(Aligned(a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
    return module_of(kernel), next(n for n, o in vars(sys.modules[module_of(kernel)]).items() if o is kernel), arch, plain, kwargs


def compile_one(work: tuple) -> dict:
    """Compile one job; {"shared", "registers", "spills", "seconds"} or {"error", "seconds"}."""
    module, name, arch, args, kwargs = work
    jit = jit_of(getattr(sys.modules[module], name))
    options, signature, constexprs, attrs = _pack(jit, arch, args, kwargs)
    knobs.nvidia.dump_ptxas_log = True  # ptxas runs with -v either way; this prints its report, caught below
    report = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(report):
            compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                      options=options.__dict__)
    except Exception as e:  # every failure is a finding, judged by the caller: its type and telling line
        return dict(error=describe(e), seconds=time.perf_counter() - start)
    ptxas = report.getvalue()
    regs = re.search(r"Used (\d+) registers", ptxas)
    spills = re.search(r"(\d+) bytes spill stores", ptxas)
    return dict(shared=compiled.metadata.shared, registers=int(regs[1]) if regs else None,
                spills=int(spills[1]) if spills else None, seconds=time.perf_counter() - start)
