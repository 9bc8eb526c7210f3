"""network.type = "embedding": on the bundled demo's pretrained base the fixed-evaluation loss drops as much as the
LoRA learning test asks; on the random-init test demo only the new vectors train and the run's files are embeddings
that previews, sample and a resumed state use by name."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gesso.engine.config.load import load_config
from gesso.engine.embedding.vectors import read_embedding
from gesso.engine.loop.inputs import find_inputs
from gesso.engine.loop.train import fixed_eval_loss, prepare_run, train
from gesso.engine.lora.files import read_lora_header
from gesso.engine.memory.network_setup import train_optimizer
from gesso.engine.run.state import load_state
from gesso.engine.sampling import sample as single
from gesso.errors import TrainError

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "tests" / "data" / "demo.toml"
# a demo but for the network (4 vectors from "shape", learning rate 0.2) and 2 repeats
EMBEDDING = ["network.type=embedding", "network.num_vectors=4", "network.init_word='shape'", "train.learning_rate=0.2",
             "dataset.repeats=2"]


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ti")
    cfg = load_config(DEMO, EMBEDDING + ["output.save_dtype=fp32", f"dataset.cache_dir='{out / 'cache'}'"])
    return cfg, train(cfg, out)


@pytest.mark.slow
def test_embedding_learns_on_a_fixed_evaluation_set(tmp_path):
    # The user's demo (examples/demo.toml, its pretrained base and 10_gssdemo) with an embedding in place of the
    # LoRA: 4 vectors from "shape", 2 repeats (54 steps). The same images, timesteps and noise with the starting
    # vectors (init_word) and with the trained ones, so a drop is the vectors' doing. The bound is the LoRA learning
    # test's 15% (tests/engine/loop/test_train.py); measured 0.35964 -> 0.25407 (-29%) on CPU. (On the random-init test
    # demo the text path barely moves the UNet's output: -0.04%.)
    cfg = load_config(ROOT / "examples" / "demo.toml", EMBEDDING + [
        "sample.prompts=[]", "output.save_dtype=fp32", f"dataset.cache_dir='{tmp_path / 'cache'}'"])
    result = train(cfg, tmp_path / "run", progress=False)
    sd, _, network, cache = prepare_run(find_inputs(cfg, torch.device("cpu")))
    before = fixed_eval_loss(sd.unet, cache)
    for param, trained in zip(network.parameters(), read_embedding(result.final, 2)):
        param.data.copy_(trained)
    after = fixed_eval_loss(sd.unet, cache)
    assert after <= 0.85 * before, f"eval loss {before:.5f} -> {after:.5f}: less than a 15% drop"


@pytest.mark.slow
def test_only_the_new_vectors_train(ti_run):
    cfg, _ = ti_run
    sd, _, network, _ = prepare_run(find_inputs(cfg, torch.device("cpu")))
    trainable = [p for p in sd.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in network.parameters()}  # UNet and both encoders frozen
    assert [tuple(p.shape) for p in trainable] == [(4, 32), (4, 64)]  # CLIP-L and bigG rows (tiny widths)
    optimized = [p for g in train_optimizer(network, cfg.train).param_groups for p in g["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in network.parameters()}


@pytest.mark.slow
def test_files_are_sdxl_embeddings_with_textual_inversion_metadata(ti_run):
    cfg, result = ti_run
    names = sorted(p.name for p in result.output_dir.glob("*.safetensors"))
    assert names == [f"demo-{e:06d}.safetensors" for e in range(1, cfg.train.epochs + 1)] + ["demo.safetensors"]
    tensors = load_file(result.final)
    assert tensors.keys() == {"clip_l", "clip_g"} and tensors["clip_l"].dtype == torch.float32
    meta = read_lora_header(result.final)[1]
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    assert not any(k.startswith("ss_network_") for k in meta)


@pytest.mark.slow
def test_previews_use_the_embedding_and_the_state_resumes_it(ti_run):
    cfg, result = ti_run
    assert sorted(p.name for p in (result.output_dir / "samples").glob("*.png")) == ["demo-e000002-00.png", "demo-e000004-00.png"]
    sd, _, network, _ = prepare_run(find_inputs(cfg, torch.device("cpu")))
    network.load_state(load_state(result.output_dir)["lora"], "state.pt")  # the last state: epoch 4, as the final file
    for param, trained in zip(network.parameters(), read_embedding(result.final, 2)):
        assert torch.equal(param.detach(), trained)
    spelled = " ".join(sd.embeddings.names["demo"])  # the caption word and the file name are the same vectors
    assert sd.embeddings.expand("gssdemo, embedding:demo") == f"{spelled}, {spelled}"


@pytest.mark.slow
def test_sample_uses_embeddings_by_name(ti_run):
    _, result = ti_run
    kw = dict(steps=2, width=64, height=64, seed=5, device="cpu", sampler="euler")
    with_file = [single.sample(p, "tiny-sdxl", embeddings_dir=result.output_dir, **kw)[0].tobytes()
                 for p in ("embedding:demo, a red circle", "demo, a red circle", "gssdemo, a red circle")]
    without = single.sample("demo, a red circle", "tiny-sdxl", **kw)[0].tobytes()
    assert with_file[0] == with_file[1] != without  # ComfyUI's and A1111's spellings: the same vectors
    assert with_file[2] != with_file[0]  # outside training, only the file name names the embedding


def test_a_token_no_caption_holds_is_refused(tmp_path):
    cfg = load_config(DEMO, EMBEDDING + ["network.token=nowhere", f"dataset.cache_dir='{tmp_path / 'cache'}'"])
    with pytest.raises(TrainError, match="network.token 'nowhere' appears in no caption"):
        train(cfg, tmp_path / "out")
