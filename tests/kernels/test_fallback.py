"""A Triton failure at a kernel's compile or launch never loses a call: under `auto` the kernel gives way to its
PyTorch reference for its dtype and shape class, with one warning line, and the verdict is cached per GPU, driver,
Triton and Gesso version (kernels/fallback.py). Errors are injected at the launch; the kernels that do run, run
through the interpreter. `dispatch._auto_kernel` is stubbed so that `auto` sends these CPU tensors to the kernels."""
import ast
import json
from types import SimpleNamespace

import pytest
import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

from gesso.kernels import adamw8bit as opt8
from gesso.kernels import attention as attn
from gesso.kernels import device as gpus
from gesso.kernels import dispatch, fallback
from gesso.kernels import lora_linear as lin
from test_attention import _qkv
from test_lora_linear import _inputs

ERRORS = {
    "CompilationError": lambda: CompilationError("        step: tl.constexpr = 128 >> i", ast.parse("step").body[0],
                                                 "step is already defined. constexpr cannot be reassigned"),
    "PTXASError": lambda: PTXASError("`ptxas` failed with error code 255\n`ptxas` stderr:\nptxas /tmp/k.ptx, line 9; "
                                     "error   : Feature 'cvt with .bf16.f16' requires .target sm_90 or higher"),
    "OutOfResources": lambda: OutOfResources(102400, 101376, "shared memory"),
}
TELLING = {"CompilationError": "step is already defined", "PTXASError": "requires .target sm_90",
           "OutOfResources": "Required: 102400, Hardware limit: 101376"}


class Failing:
    """A kernel whose every launch raises `error`, as a failed compile, ptxas run or resource check does."""

    def __init__(self, error: Exception):
        self.error, self.launches = error, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise self.error
        return launch


@pytest.fixture
def auto(monkeypatch, tmp_path):
    """`auto` dispatch that sends CPU tensors to the (interpreted) kernels; a fresh process's fallback state."""
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(dispatch, "_auto_kernel", lambda *args: True)
    monkeypatch.setattr(fallback, "_switched", set())
    monkeypatch.setattr(fallback, "_stores", {})


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("gesso: warning")]


@pytest.mark.parametrize("error", ERRORS)
def test_a_forward_launch_that_fails_gives_way_once_with_one_line(error, auto, monkeypatch, capsys):
    failing = Failing(ERRORS[error]())
    monkeypatch.setattr(lin, "_lora_linear_fwd_kernel", failing)
    x, w, b, down, up = _inputs((2, 20, 48), 40, 8, torch.float32, "cpu")  # CPU tensors reach no real launch
    for _ in range(2):
        y = lin.lora_linear(x, w, b, down, up, 0.5)
        assert torch.equal(y, lin.lora_linear_ref(x, w, b, down, up, 0.5))
    assert failing.launches == 1  # the second call went straight to the reference
    (line,) = _warnings(capsys)
    assert f"Triton kernel lora_linear (float32 x, float32 W, rank<=16) cannot run on CPU: {error}: " in line
    assert TELLING[error] in line and line.endswith("using its PyTorch reference from now on")


@pytest.mark.parametrize("error", ERRORS)
def test_a_backward_launch_that_fails_is_answered_by_the_references_gradients(error, auto, device, monkeypatch, capsys):
    monkeypatch.setattr(lin, "_lora_linear_bwd_dx_kernel", Failing(ERRORS[error]()))
    monkeypatch.setattr(attn, "_attention_bwd_dkdv_kernel", Failing(ERRORS[error]()))
    x, w, b, down, up = _inputs((2, 20, 48), 40, 8, torch.float32, device)
    y = lin.lora_linear(x, w, b, down, up, 0.5)  # the forward kernel ran; its backward cannot
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, down, up), dy)
    want = torch.autograd.grad(lin.lora_linear_ref(x, w, b, down, up, 0.5), (x, down, up), dy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    q, k, v = _qkv(1, 2, 30, 21, 40, torch.float32, device)
    o = attn.attention(q, k, v)
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), do)
    want = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, k, v), (q, k, v), do)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    lines = _warnings(capsys)
    assert [line.split(" (")[0] for line in lines] == ["gesso: warning: Triton kernel lora_linear",
                                                      "gesso: warning: Triton kernel attention"]
    assert all(f": {error}: " in line for line in lines)


@pytest.mark.parametrize("error", ERRORS)
def test_an_optimizer_launch_that_fails_takes_the_reference_step(error, auto, device, monkeypatch, capsys):
    p0, g = torch.randn(70, 64, device=device), torch.randn(70, 64, device=device)  # 4480 elements: 8-bit states
    monkeypatch.setattr(opt8, "_adamw8bit_kernel", Failing(ERRORS[error]()))
    runs = []
    for mode in ("auto", "reference"):
        monkeypatch.setenv(dispatch.ENV_VAR, mode)
        p = torch.nn.Parameter(p0.clone())
        opt = opt8.AdamW8bit([p], lr=1e-2)
        for _ in range(2):
            p.grad = g.clone()
            opt.step()
        runs.append((p.detach(), opt.state[p]))
    (p_auto, s_auto), (p_ref, s_ref) = runs
    assert torch.equal(p_auto, p_ref) and torch.equal(s_auto["m_code"], s_ref["m_code"])
    assert len(_warnings(capsys)) == 1


def test_an_error_in_a_called_jit_function_is_named_by_the_compilers_message():
    """Triton's code generator wraps an error inside a called @triton.jit function (the 8-bit AdamW's code search) in
    a CompilationError that carries only the call's position; the compiler's message is on its cause."""
    inner = CompilationError("step: tl.constexpr = 128 >> i", ast.parse("step").body[0],
                             "ValueError('step is already defined. constexpr cannot be reassigned.')")
    try:
        raise CompilationError("m_code = _nearest_code(m_new, m_mids_ptr)", ast.parse("m_code").body[0], None) from inner
    except CompilationError as outer:
        assert str(outer).splitlines()[0] == "at 1:0:"
        assert fallback.describe(outer) == ("CompilationError: ValueError('step is already defined. "
                                            "constexpr cannot be reassigned.')")


def test_a_forced_kernel_lets_its_error_through(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")  # the GPU parity tests: a failure must fail them
    monkeypatch.setattr(lin, "_lora_linear_fwd_kernel", Failing(ERRORS["PTXASError"]()))
    with pytest.raises(PTXASError):
        lin.lora_linear(*_inputs((2, 20, 48), 40, 8, torch.float32, "cpu"), 0.5)


@pytest.fixture
def stub_gpu(monkeypatch):
    props = SimpleNamespace(name="NVIDIA GeForce RTX 4090", major=8, minor=9, shared_memory_per_block_optin=101376,
                            total_memory=24 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
    gpus._gpu.cache_clear()
    yield torch.device("cuda", 0)
    gpus._gpu.cache_clear()


def test_verdicts_are_kept_per_gpu_driver_triton_and_gesso_version(auto, stub_gpu, monkeypatch, tmp_path, capsys):
    fallback.give_way("lora_linear", "bfloat16 x, bfloat16 W, rank<=16", stub_gpu, "OutOfResources: shared memory")
    assert "cannot run on NVIDIA GeForce RTX 4090" in capsys.readouterr().err
    path = tmp_path / "cache" / "gesso" / fallback.VERDICTS_FILE
    (key, ops), = json.loads(path.read_text()).items()
    assert key.startswith("NVIDIA GeForce RTX 4090 sm_89 | driver ") and f"| triton {triton.__version__} |" in key
    assert " | gesso 0.1.0 (" in key
    assert ops["lora_linear"]["bfloat16 x, bfloat16 W, rank<=16"]["use"] == "reference"
    assert not list(path.parent.glob(".*.tmp"))  # written through a temporary file, renamed over
    monkeypatch.setattr(fallback, "_switched", set())  # the next process: the cached verdict alone
    monkeypatch.setattr(fallback, "_stores", {})
    assert fallback.switched("lora_linear", "bfloat16 x, bfloat16 W, rank<=16", stub_gpu)
    assert not fallback.switched("lora_linear", "bfloat16 x, bfloat16 W, rank<=32", stub_gpu)
    monkeypatch.setattr(fallback, "_stores", {})
    monkeypatch.setattr(triton, "__version__", "9.99.0")  # another Triton: judged again
    assert not fallback.switched("lora_linear", "bfloat16 x, bfloat16 W, rank<=16", stub_gpu)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"k": {"lora_linear": {"c": {"use": "maybe"}}}}', ""])
def test_a_damaged_verdict_file_counts_as_absent_and_is_rewritten(content, auto, stub_gpu, monkeypatch, tmp_path):
    path = tmp_path / "cache" / "gesso" / fallback.VERDICTS_FILE
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert not fallback.switched("attention", "bfloat16, head dim<=64", stub_gpu)
    fallback.verdicts(stub_gpu).record("attention", "bfloat16, head dim<=64", "triton", "agrees")
    (ops,) = json.loads(path.read_text()).values()
    assert ops == {"attention": {"bfloat16, head dim<=64": {"use": "triton", "why": "agrees", "date": ops["attention"][
        "bfloat16, head dim<=64"]["date"]}}}


def test_a_cache_folder_that_cannot_be_written_costs_one_note_not_the_run(auto, stub_gpu, tmp_path, capsys):
    blocked = tmp_path / "cache" / "gesso"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the folder should be")
    for cls in ("bfloat16, head dim<=64", "bfloat16, head dim<=128"):
        fallback.give_way("attention", cls, stub_gpu, "PTXASError: x")
    err = capsys.readouterr().err
    assert err.count("gesso: note: cannot keep kernel verdicts in") == 1 and err.count("gesso: warning") == 2
    assert fallback.switched("attention", "bfloat16, head dim<=128", stub_gpu)  # held for this run
