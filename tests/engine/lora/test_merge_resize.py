"""merge: the baked checkpoint computes what base + LoRA computes; resize: SVD truncation with its retained norm."""
import pytest
import torch
from formats_testutil import diffusers_out, engine_out, export, pipeline, random_network, tiny, unet_inputs
from models_testutil import rel_err
from safetensors import safe_open
from safetensors.torch import save_file

from gesso import models
from gesso.engine.lora import formats as lora_convert
from gesso.engine.lora import tools as lora_tools
from gesso.engine.lora.files import save_lora
from gesso.engine.lora.network import load_network


def lora_file(sd, path, seed: int) -> None:
    network = random_network(sd.unet, seed=seed)
    save_lora(path, network.kohya_state_dict(), {})
    network.remove()


def deltas(lo: lora_convert.LoRA) -> dict[str, torch.Tensor]:
    return {n: m.delta((m.up.shape[0], m.down[0].numel())).double() for n, m in lo.modules.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_merged_checkpoint_equals_base_plus_lora(name, tmp_path):
    sd = tiny(name)
    export(sd, tmp_path / "base.safetensors")
    lora_file(sd, tmp_path / "a.safetensors", seed=1)
    inputs = unet_inputs(sd.cfg, seed=2)
    network = load_network(sd.unet, tmp_path / "a.safetensors", multiplier=0.7)
    expected = engine_out(sd, inputs)
    network.remove()
    assert rel_err(engine_out(sd, inputs), expected) > 1e-2  # the LoRA matters at this strength

    lora_tools.merge_lora(tmp_path / "base.safetensors", [(tmp_path / "a.safetensors", 0.7)], tmp_path / "merged.safetensors")
    merged = models.load_model(tmp_path / "merged.safetensors")
    assert rel_err(engine_out(merged, inputs), expected) < 1e-5


@pytest.mark.slow
def test_stacked_merge_equals_sequential_and_keeps_layout_and_dtype(tmp_path):
    sd = tiny("tiny-sdxl")
    export(sd, tmp_path / "base.safetensors", dtype=torch.float16)
    lora_file(sd, tmp_path / "a.safetensors", seed=3)
    lora_file(sd, tmp_path / "b.safetensors", seed=4)
    # b in diffusers' layout: merge reads any layout
    b = lora_convert.read(tmp_path / "b.safetensors", sd.cfg)
    save_file(lora_convert.to_diffusers(b, sd.cfg), str(tmp_path / "b_diffusers.safetensors"))

    base = tmp_path / "base.safetensors"
    lora_tools.merge_lora(base, [(tmp_path / "a.safetensors", 0.8), (tmp_path / "b_diffusers.safetensors", -0.5)], tmp_path / "both.safetensors")
    lora_tools.merge_lora(base, [(tmp_path / "a.safetensors", 0.8)], tmp_path / "step1.safetensors")
    lora_tools.merge_lora(tmp_path / "step1.safetensors", [(tmp_path / "b.safetensors", -0.5)], tmp_path / "step2.safetensors")
    with safe_open(str(base), "pt") as f0, safe_open(str(tmp_path / "both.safetensors"), "pt") as f1, \
            safe_open(str(tmp_path / "step2.safetensors"), "pt") as f2:
        assert set(f0.keys()) == set(f1.keys()) == set(f2.keys())
        changed = 0
        for key in f0.keys():
            t0, t1, t2 = f0.get_tensor(key), f1.get_tensor(key), f2.get_tensor(key)
            assert t1.dtype == t0.dtype and t1.shape == t0.shape, key
            if torch.equal(t0, t1):
                continue
            changed += 1
            assert "diffusion_model" in key
            # fp16 storage: the two routes differ by at most a rounding of the intermediate file
            assert (t1.float() - t2.float()).abs().max() <= 2 * torch.finfo(torch.float16).eps * t1.float().abs().max() + 1e-4
        assert changed == len(lora_convert.read(tmp_path / "a.safetensors", sd.cfg).modules)


def test_merge_refuses_a_lora_for_another_model(tmp_path):
    sdxl, sd15 = tiny("tiny-sdxl"), tiny("tiny-sd15")
    export(sdxl, tmp_path / "base.safetensors")
    lora_file(sd15, tmp_path / "sd15.safetensors", seed=5)
    with pytest.raises(lora_convert.LoRAFileError, match="sd15.safetensors"):
        lora_tools.merge_lora(tmp_path / "base.safetensors", [(tmp_path / "sd15.safetensors", 1.0)], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.fixture(scope="module")
def lo(tmp_path_factory):
    sd = tiny("tiny-sdxl")
    path = tmp_path_factory.mktemp("resize") / "a.safetensors"
    lora_file(sd, path, seed=6)
    return lora_convert.read(path, sd.cfg)


def test_resize_to_full_rank_is_lossless(lo):
    resized, report = lora_tools.resize(lo, rank=4)
    before, after = deltas(lo), deltas(resized)
    assert all(r.retained == pytest.approx(1.0, abs=1e-6) for r in report)
    assert max(rel_err(after[n], before[n]) for n in before) < 1e-5


def test_resize_to_lower_rank_reports_the_norm_it_keeps(lo):
    resized, report = lora_tools.resize(lo, rank=2)
    before, after = deltas(lo), deltas(resized)
    assert {r.rank_after for r in report} == {2}
    for r in report:
        full, cut = before[r.name], after[r.name]
        kept = cut.norm() / full.norm()
        assert r.retained == pytest.approx(kept.item(), rel=1e-6)
        if lo.modules[r.name].rank > 2:
            assert r.retained < 1
            # Eckart-Young: the truncation is orthogonal to what it drops
            assert (full - cut).norm().square().item() == pytest.approx(full.norm().square().item() - cut.norm().square().item(), rel=1e-6)


def test_resize_by_energy_keeps_the_fewest_ranks_that_reach_it(lo):
    _, report = lora_tools.resize(lo, energy=0.9)
    before = deltas(lo)
    assert any(r.rank_after < r.rank_before for r in report)
    for r in report:
        s = torch.linalg.svdvals(before[r.name])
        fraction = (s.square().cumsum(0) / s.square().sum()).sqrt()
        assert r.retained >= 0.9 - 1e-9 and r.retained == pytest.approx(fraction[r.rank_after - 1].item(), rel=1e-6)
        if r.rank_after > 1:
            assert fraction[r.rank_after - 2] < 0.9


@pytest.mark.slow
def test_resized_file_with_mixed_ranks_loads_in_diffusers_at_the_right_strength(lo, tmp_path):
    sd = tiny("tiny-sdxl")
    pipe = pipeline(sd)
    resized, report = lora_tools.resize(lo, energy=0.9)
    assert len({r.rank_after for r in report}) > 1
    path = tmp_path / "resized.safetensors"
    save_lora(path, lora_convert.to_kohya(resized), {})
    inputs = unet_inputs(sd.cfg, seed=7)
    load_network(sd.unet, path)
    pipe.load_lora_weights(str(path))
    assert rel_err(engine_out(sd, inputs), diffusers_out(pipe.unet, inputs)) < 1e-5
