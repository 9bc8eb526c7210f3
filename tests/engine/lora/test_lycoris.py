"""DoRA, LoHa and LoKr deltas against the references on the same tensors, in fp32 within 1e-5.

References: the `lycoris-lora` package (lycoris/modules/locon.py, loha.py, lokr.py: each module's `get_weight` /
`make_weight`, the weight its forward adds, and `apply_weight_decompose` for DoRA) and PEFT's DoRA (peft/tuners/lora,
`use_dora=True`, merged with `merge_and_unload`). LyCORIS's `get_diff_weight` multiplies by alpha / rank a second
time on top of `get_weight` (4.1.3), so it is not the reference: its forward and every consumer scale once.
"""
import pytest
import torch
import torch.nn as nn
from lycoris.functional.general import factorization as lycoris_factorization
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule

from gesso.engine.lora import lycoris

BASES = [
    pytest.param(lambda: nn.Linear(24, 36), id="linear"),  # minimal
    pytest.param(lambda: nn.Linear(45, 33), id="linear-odd"),  # non-aligned, 33 = 3 x 11 factorises unevenly
    pytest.param(lambda: nn.Conv2d(12, 20, 3, padding=1), id="conv3x3"),  # LoCon's res-block convs
    pytest.param(lambda: nn.Conv2d(16, 8, 1), id="conv1x1"),  # proj_in of SD 1.x
]


def randomised(ref: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Fresh random values (never the zero init) in every tensor of a LyCORIS module but alpha; its state as a file holds it."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in ref.state_dict().items() if k != "alpha"}
    with torch.no_grad():
        for k, v in state.items():
            v.copy_(torch.randn(v.shape, generator=g) * 0.3 + (1.0 if k == "dora_scale" else 0.0))
    return {k: v.clone() for k, v in ref.state_dict().items() if k != "alpha"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("make", BASES)
@pytest.mark.parametrize("rank, alpha", [(4, 2.0), (3, 7.0)])
def test_loha_delta_equals_lycoris(make, rank, alpha):
    torch.manual_seed(0)
    base = make()
    ref = LohaModule("m", base, 1.0, rank, alpha)
    tensors = randomised(ref, seed=rank)
    want = ref.get_weight(tuple(base.weight.shape))
    got = lycoris.delta_weight(tensors, alpha, tuple(base.weight.shape))
    assert got.shape == base.weight.shape and rel(got, want) < 1e-5


@pytest.mark.parametrize("make", BASES)
@pytest.mark.parametrize("rank, factor", [
    (2, 0),  # most balanced split, w2 factorised into w2_a @ w2_b
    (2, 4),  # kohya's `factor=4`
    (64, 0),  # rank too large for the split: LyCORIS keeps w2 whole and the scale at 1
])
def test_lokr_delta_equals_lycoris(make, rank, factor):
    torch.manual_seed(1)
    base = make()
    ref = LokrModule("m", base, 1.0, rank, 5.0, factor=factor or -1)
    ours = lycoris.fresh_tensors(base, "lokr", rank, lycoris.Options(lokr_factor=factor))
    tensors = randomised(ref, seed=rank + factor)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in tensors.items()}  # the shapes LyCORIS makes
    alpha = float(ref.alpha)
    want = ref.get_weight(tuple(base.weight.shape))
    got = lycoris.delta_weight(tensors, alpha, tuple(base.weight.shape))
    assert rel(got, want) < 1e-5


def test_factorization_equals_lycoris():
    for dim in range(1, 700):
        for factor in (0, 2, 4, 8, 16):
            assert lycoris.factorization(dim, factor) == lycoris_factorization(dim, factor or -1), (dim, factor)


@pytest.mark.parametrize("make", BASES)
@pytest.mark.parametrize("on_output", [False, True], ids=["in-axis", "out-axis"])
def test_dora_delta_equals_lycoris(make, on_output):
    torch.manual_seed(2)
    base = make()
    ref = LoConModule("m", base, 1.0, 4, 3.0, weight_decompose=True, wd_on_out=on_output)
    ours = lycoris.fresh_tensors(base, "dora", 4, lycoris.Options(dora_on_output=on_output))
    assert torch.allclose(ours["dora_scale"], ref.dora_scale, rtol=1e-6)  # the same magnitude, in the same shape
    tensors = randomised(ref, seed=3)
    w = base.weight.detach()
    want = ref.apply_weight_decompose(w + ref.make_weight() * ref.scale) - w
    got = lycoris.delta_weight(tensors, 3.0, tuple(w.shape), w)
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("make", [BASES[0], BASES[1], BASES[2]])
def test_dora_delta_equals_peft(make):
    # PEFT's magnitude is the row norm (lora_magnitude_vector, (out,)): Gesso's output-axis dora_scale, reshaped
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    model = nn.Sequential(make())
    before = model[0].weight.detach().clone()
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=6, target_modules=["0"], use_dora=True, init_lora_weights=False))
    layer = peft.base_model.model[0]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"].weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    tensors = {"lora_down.weight": layer.lora_A["default"].weight.detach().clone(),
               "lora_up.weight": layer.lora_B["default"].weight.detach().clone(),
               "dora_scale": layer.lora_magnitude_vector["default"].weight.detach().reshape(-1, *[1] * (before.dim() - 1)).clone()}
    want = peft.merge_and_unload()[0].weight.detach() - before
    got = lycoris.delta_weight(tensors, 6.0, tuple(before.shape), before)
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("algo", lycoris.ALGOS)
@pytest.mark.parametrize("make", [BASES[1], BASES[2]])
def test_module_forward_adds_its_delta_and_starts_unchanged(algo, make):
    torch.manual_seed(6)
    base = make()
    x = torch.randn(3, 45) if isinstance(base, nn.Linear) else torch.randn(2, base.in_channels, 7, 5)
    m = lycoris.new_module(base, algo, 4, 2.0, lycoris.Options())
    assert torch.allclose(m(x), base(x), atol=1e-5)  # the zero-initialised half keeps the model as it was
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.tensors().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    m.multiplier = 0.7  # strength k adds k * delta, DoRA's k * (W' - W) included
    w = base.weight.detach() + 0.7 * lycoris.delta_weight({k: p.detach() for k, p in m.tensors().items()}, 2.0,
                                                          tuple(base.weight.shape), base.weight.detach())
    if isinstance(base, nn.Linear):
        want = nn.functional.linear(x, w, base.bias)
    else:
        want = nn.functional.conv2d(x, w, base.bias, base.stride, base.padding)
    assert rel(m(x).detach(), want.detach()) < 1e-5
    m(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.tensors().values())


@pytest.mark.parametrize("on_output", [False, True], ids=["in-axis", "out-axis"])
def test_dora_linear_through_the_lora_kernel_equals_the_rebuilt_weight(on_output):
    # training's path (engine/lora/lycoris.py dora_linear): the magnitude rescale folded around kernels/lora_linear.py
    torch.manual_seed(8)
    base = nn.Linear(45, 33).requires_grad_(False)
    m = lycoris.new_module(base, "dora", 4, 3.0, lycoris.Options(dora_on_output=on_output))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in m.tensors().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(5, 45, requires_grad=True)
    params = [x, *m.tensors().values()]
    got = m(x)
    got_grads = torch.autograd.grad(got.square().sum(), params)
    w = base.weight + lycoris.delta_weight(m.tensors(), 3.0, tuple(base.weight.shape), base.weight)
    want = nn.functional.linear(x, w, base.bias)
    want_grads = torch.autograd.grad(want.square().sum(), params)
    assert rel(got, want) < 1e-5
    assert all(rel(a, b) < 1e-5 for a, b in zip(got_grads, want_grads))


@pytest.mark.parametrize("make", [BASES[1], BASES[2]])
@pytest.mark.parametrize("cls, kwargs", [(LohaModule, {}), (LokrModule, {"factor": 4})], ids=["loha", "lokr"])
def test_loha_and_lokr_with_dora_scale_equal_lycoris(make, cls, kwargs):
    # files trained with LyCORIS's dora_wd on LoHa/LoKr carry a dora_scale beside their own tensors; read, not trained here
    torch.manual_seed(10)
    base = make()
    ref = cls("m", base, 1.0, 2, 3.0, weight_decompose=True, wd_on_out=False, **kwargs)
    tensors = randomised(ref, seed=11)
    w = base.weight.detach()
    want = ref.apply_weight_decompose(w + ref.get_weight(tuple(w.shape))) - w
    got = lycoris.delta_weight(tensors, float(ref.alpha), tuple(w.shape), w)
    assert lycoris.algo_of(tensors) == cls.__name__[:4].lower() and rel(got, want) < 1e-5
