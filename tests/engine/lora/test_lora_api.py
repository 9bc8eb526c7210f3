"""convert_lora, merge_lora and resize_lora called as a host program calls them: tensors on disk, and typed errors."""
import pytest
import torch
from formats_testutil import export, random_network, tiny
from models_testutil import rel_err

from gesso.engine.lora import formats as lora_convert
from gesso.engine.lora.files import read_lora, save_lora
from gesso.engine.lora.tools import convert_lora, merge_lora, resize_lora
from gesso.errors import CheckpointError, LoRAFileError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_api")
    sd = tiny("tiny-sdxl")
    export(sd, tmp / "base.safetensors")
    network = random_network(sd.unet, seed=5)  # attention and LoCon modules at rank 4, 3x3 convs at rank 2
    save_lora(tmp / "a.safetensors", network.kohya_state_dict(), {"ss_base_model_version": "sdxl_base_v1-0"})
    network.remove()
    return sd, tmp


def modules(path) -> dict[str, dict[str, torch.Tensor]]:
    """kohya name -> {"down", "up", "alpha"} of a kohya-layout file."""
    out = {}
    for key, t in read_lora(path)[0].items():
        name, part = lora_convert.split_key(key)
        out.setdefault(name, {})[part] = t
    return out


def delta(m: dict[str, torch.Tensor]) -> torch.Tensor:
    """alpha / rank * up @ down, (out, fan_in), in float64."""
    return m["alpha"].double() / m["down"].shape[0] * (m["up"].flatten(1).double() @ m["down"].flatten(1).double())


def test_convert_kohya_to_kohya_keeps_every_tensor_and_casts_on_request(files):
    _, tmp = files
    a = modules(tmp / "a.safetensors")
    assert convert_lora(tmp / "a.safetensors", tmp / "same.safetensors", model="tiny-sdxl") == tmp / "same.safetensors"
    same = modules(tmp / "same.safetensors")
    assert same.keys() == a.keys() and len(a) == 258
    assert all(torch.equal(same[n][p], a[n][p]) for n in a for p in ("down", "up", "alpha"))

    convert_lora(str(tmp / "a.safetensors"), str(tmp / "half.safetensors"), model="tiny-sdxl", dtype="bf16")
    half = modules(tmp / "half.safetensors")
    assert all(half[n]["down"].dtype == torch.bfloat16 and torch.equal(half[n]["up"], a[n]["up"].bfloat16()) for n in a)


def test_convert_round_trip_through_diffusers_keeps_every_module(files):
    _, tmp = files
    out = convert_lora(tmp / "a.safetensors", tmp / "d.safetensors", to="diffusers", model="tiny-sdxl")
    tensors = read_lora(out)[0]
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert len(tensors) == 2 * 258
    convert_lora(out, tmp / "k.safetensors", to="kohya", model="tiny-sdxl")
    a, back = modules(tmp / "a.safetensors"), modules(tmp / "k.safetensors")
    assert back.keys() == a.keys()
    for name in a:
        assert torch.equal(back[name]["down"], a[name]["down"]), name  # lora_A is the down weight as it was
        # diffusers folds alpha / rank into lora_B: the update, not the up weight, survives the trip
        assert rel_err(delta(back[name]), delta(a[name])) < 1e-6, name


def test_merge_adds_the_weighted_update_to_the_target_weight(files):
    sd, tmp = files
    base = read_lora(tmp / "base.safetensors")[0]
    targets = lora_convert.layout(sd.cfg).targets
    a = modules(tmp / "a.safetensors")
    linear = next(n for n in sorted(a) if a[n]["down"].dim() == 2)
    conv = next(n for n in sorted(a) if a[n]["down"].dim() == 4 and a[n]["down"].shape[-1] == 3)

    counts = merge_lora(tmp / "base.safetensors", [(tmp / "a.safetensors", -0.6)], tmp / "m.safetensors")
    assert counts == {str(tmp / "a.safetensors"): 258}
    merged = read_lora(tmp / "m.safetensors")[0]
    for name in (linear, conv):
        key = targets[name].key
        expected = base[key].double() - 0.6 * delta(a[name]).reshape(base[key].shape)
        assert (merged[key].double() - expected).abs().max() < 1e-6, name
        assert (merged[key] - base[key]).abs().max() > 1e-3, name  # the update is not lost in rounding
    touched = {targets[n].key for n in a}
    untouched = [k for k in base if k not in touched]
    assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)

    # a bare path is weight 1
    merge_lora(str(tmp / "base.safetensors"), [str(tmp / "a.safetensors")], str(tmp / "m1.safetensors"))
    key = targets[linear].key
    one = read_lora(tmp / "m1.safetensors")[0][key].double()
    assert (one - base[key].double() - delta(a[linear]).reshape(one.shape)).abs().max() < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 3])  # 1: every module cut; 3: rank-4 modules cut, rank-2 convs kept
def test_resize_to_rank_gives_best_rank_r_modules(files, rank):
    _, tmp = files
    report = resize_lora(tmp / "a.safetensors", tmp / f"r{rank}.safetensors", rank=rank, model="tiny-sdxl")
    a, resized = modules(tmp / "a.safetensors"), modules(tmp / f"r{rank}.safetensors")
    assert resized.keys() == a.keys() and len(report) == len(a)
    by_name = {r.name: r for r in report}
    for name, m in resized.items():
        expected_rank = min(rank, a[name]["down"].shape[0])
        assert m["down"].shape[0] == m["up"].shape[1] == by_name[name].rank_after == expected_rank, name
        assert torch.linalg.matrix_rank(delta(m)).item() == expected_rank, name
        # Eckart-Young: the truncated SVD of the original update
        u, s, vh = torch.linalg.svd(delta(a[name]), full_matrices=False)
        best = u[:, :expected_rank] * s[:expected_rank] @ vh[:expected_rank]
        assert rel_err(delta(m), best) < 1e-5, name
        assert by_name[name].retained == pytest.approx((s[:expected_rank].norm() / s.norm()).item(), rel=1e-6)


def test_resize_by_energy_keeps_that_fraction(files):
    _, tmp = files
    report = resize_lora(tmp / "a.safetensors", tmp / "e.safetensors", energy=0.9, model="tiny-sdxl")
    assert all(0.9 - 1e-9 <= r.retained <= 1 and r.rank_after <= r.rank_before for r in report)
    assert any(r.rank_after < r.rank_before for r in report)


@pytest.mark.parametrize("call, error, named", [
    (lambda t: convert_lora(t / "missing.safetensors", t / "o.safetensors"), LoRAFileError, "missing.safetensors: no such file"),
    (lambda t: convert_lora(t / "a.safetensors", t / "o.safetensors", to="peft"), LoRAFileError, "o.safetensors: layout 'peft'"),
    (lambda t: convert_lora(t / "a.safetensors", t / "o.safetensors", dtype="fp8"), LoRAFileError, "o.safetensors: dtype 'fp8'"),
    (lambda t: convert_lora(t / "a.safetensors", t / "o.safetensors", model=t / "nockpt.safetensors"), CheckpointError,
     "nockpt.safetensors"),
    (lambda t: convert_lora(t / "a.safetensors", t / "o.safetensors", model="tiny-sd15"), LoRAFileError,
     "a.safetensors: lora_unet_"),  # shapes of another architecture
    (lambda t: merge_lora(t / "missing.safetensors", [t / "a.safetensors"], t / "o.safetensors"), CheckpointError,
     "missing.safetensors"),
    (lambda t: merge_lora(t / "base.safetensors", [(t / "missing.safetensors", 0.5)], t / "o.safetensors"), LoRAFileError,
     "missing.safetensors: no such file"),
    (lambda t: merge_lora(t / "base.safetensors", [t / "a.safetensors"], t / "o.ckpt"), LoRAFileError, "o.ckpt: the merged checkpoint is written as .safetensors"),
    (lambda t: merge_lora(t / "base.safetensors", [(t / "a.safetensors", "strong")], t / "o.safetensors"), LoRAFileError,
     "a.safetensors: weight 'strong'"),
    (lambda t: resize_lora(t / "missing.safetensors", t / "o.safetensors", rank=2), LoRAFileError,
     "missing.safetensors: no such file"),
    (lambda t: resize_lora(t / "a.safetensors", t / "o.safetensors", model="tiny-sdxl"), LoRAFileError,
     "a.safetensors: give exactly one of rank and energy"),
    (lambda t: resize_lora(t / "a.safetensors", t / "o.safetensors", rank=2, energy=0.9, model="tiny-sdxl"), LoRAFileError,
     "a.safetensors: give exactly one of rank and energy"),
    (lambda t: resize_lora(t / "a.safetensors", t / "o.safetensors", energy=1.5, model="tiny-sdxl"), LoRAFileError,
     "a.safetensors: rank must be >= 1 and energy in (0, 1]"),
])
def test_bad_input_raises_one_line_naming_the_file(files, call, error, named):
    _, tmp = files
    with pytest.raises(error) as info:
        call(tmp)
    assert named in str(info.value) and "\n" not in str(info.value)
    assert not (tmp / "o.safetensors").exists() and not (tmp / "o.ckpt").exists()
