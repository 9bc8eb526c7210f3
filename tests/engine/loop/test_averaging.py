"""EMA and schedule-free weights: the EMA file is a float64 EMA of the per-step weights, a resume with either is bit-exact,
and a schedule-free run's file holds the library's evaluation weights while its training weights carry on."""
from pathlib import Path

import pytest
import torch
from schedulefree import AdamWScheduleFree

from gesso.engine.config.load import load_config
from gesso.engine.loop.averaging import EMA
from gesso.engine.loop.inputs import find_inputs
from gesso.engine.loop.train import prepare_run, train
from gesso.engine.lora.files import read_lora
from gesso.models.files import load_weights_only

DEMO = Path(__file__).resolve().parents[3] / "tests" / "data" / "demo.toml"


def small(tmp_path, *extra):
    # 12 images / batch 4 = 3 steps per epoch, 2 epochs
    return load_config(DEMO, ["train.epochs=2", "dataset.repeats=1", "sample.prompts=[]", "output.save_dtype='fp32'",
                              f"dataset.cache_dir='{tmp_path / 'cache'}'", *extra])


def test_ema_equals_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(5, 3, generator=g)]
    ema, ref = EMA(weights, 0.9), weights[0].double().clone()
    for _ in range(50):
        weights[0].add_(torch.randn(5, 3, generator=g) * 0.1)
        ema.update(weights)
        ref = 0.9 * ref + 0.1 * weights[0].double()
    assert (ema.shadow[0].double() - ref).abs().max() < 1e-5


@pytest.mark.slow
def test_ema_files_resume_bit_exact_and_the_raw_weights_beside_them(tmp_path):
    cfg = small(tmp_path, "train.ema_decay=0.8", "output.save_non_ema=true")
    steps = []

    def record(event):  # the raw weights after each step, from the state the run would save
        if event["event"] == "step":
            steps.append(event["step"])

    whole = train(cfg, tmp_path / "whole", on_event=record, progress=False)
    ema_file, raw_file = read_lora(whole.final)[0], read_lora(tmp_path / "whole" / "demo-non-ema.safetensors")[0]
    assert (tmp_path / "whole" / "demo-000001-non-ema.safetensors").is_file()
    assert any(not torch.equal(ema_file[k], raw_file[k]) for k in ema_file)
    state = load_weights_only(tmp_path / "whole" / "state.pt")
    assert all(torch.equal(raw_file[k], state["lora"][k]) for k in raw_file)  # the state trains on from the raw weights

    def stop_at(step):
        def on_event(event):
            if event["event"] == "step" and event["step"] == step:
                raise KeyboardInterrupt
        return on_event

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", on_event=stop_at(4), progress=False)
    resumed = train(cfg, tmp_path / "cut", resume=tmp_path / "cut", progress=False)
    again = read_lora(resumed.final)[0]
    assert all(torch.equal(ema_file[k], again[k]) for k in ema_file)


@pytest.mark.slow
def test_ema_file_is_the_ema_of_the_per_step_weights(tmp_path):
    cfg = small(tmp_path, "train.ema_decay=0.7", "train.epochs=1", "output.save_every_n_steps=1")
    raw = small(tmp_path, "train.epochs=1", "output.save_every_n_steps=1")
    run = train(raw, tmp_path / "raw", progress=False)
    per_step = [read_lora(tmp_path / "raw" / f"demo-step{s:08d}.safetensors")[0] for s in (1, 2)] + [read_lora(run.final)[0]]
    torch.manual_seed(cfg.train.seed)  # the initial weights: the run's own, from its seed
    _, _, network, _ = prepare_run(find_inputs(cfg, torch.device("cpu")))
    start = {k: v.detach().double() for k, v in network.kohya_state_dict().items()}
    ema_file = read_lora(train(cfg, tmp_path / "ema", progress=False).final)[0]
    for key in ema_file:
        ref = start[key]
        for weights in per_step:
            ref = 0.7 * ref + 0.3 * weights[key].double()
        assert (ema_file[key].double() - ref).abs().max() <= 1e-6 * max(1.0, ref.abs().max().item())


SCHEDULE_FREE = ("train.optimizer='adamw_schedulefree'", "train.learning_rate=1e-3")


@pytest.fixture(scope="module")
def schedule_free(tmp_path_factory):
    """An uninterrupted schedule-free run (2 epochs of 3 steps, an epoch file after each): its folder and config."""
    root = tmp_path_factory.mktemp("schedule_free")
    cfg = small(root, *SCHEDULE_FREE)
    train(cfg, root / "whole", progress=False)
    return root / "whole", cfg


@pytest.mark.slow
def test_schedule_free_file_holds_the_librarys_evaluation_weights(schedule_free):
    folder, cfg = schedule_free
    state = load_weights_only(folder / "state.pt")
    _, _, network, _ = prepare_run(find_inputs(cfg, torch.device("cpu")))
    names = list(network.named_tensors())  # the network's order, as the optimizer holds its parameters
    params = [torch.nn.Parameter(state["lora"][k].clone()) for k in names]
    opt = AdamWScheduleFree(params, lr=1e-3)
    opt.load_state_dict(state["optimizer"])
    assert opt.param_groups[0]["train_mode"]  # the state keeps the training weights
    opt.eval()
    saved = read_lora(folder / "demo.safetensors")[0]
    live = dict(zip(names, params))
    assert any(not torch.equal(saved[k], state["lora"][k]) for k in names)
    assert all(torch.equal(saved[k], live[k].detach()) for k in names)


@pytest.mark.slow
def test_schedule_free_resume_is_bit_exact(tmp_path, schedule_free):
    # stopped at step 4, after epoch 1's file (its evaluation weights swapped in and out) and mid-epoch 2
    folder, cfg = schedule_free

    def stop_at_4(event):
        if event["event"] == "step" and event["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", on_event=stop_at_4, progress=False)
    cut = load_weights_only(tmp_path / "cut" / "state.pt")
    assert cut["step"] == 4 and all("z" in s for s in cut["optimizer"]["state"].values())  # the library's z sequence
    train(cfg, tmp_path / "cut", resume=tmp_path / "cut", progress=False)
    for name in ("demo.safetensors", "demo-000001.safetensors"):
        a, b = read_lora(folder / name)[0], read_lora(tmp_path / "cut" / name)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    whole, resumed = load_weights_only(folder / "state.pt"), load_weights_only(tmp_path / "cut" / "state.pt")
    assert all(torch.equal(whole["lora"][k], resumed["lora"][k]) for k in whole["lora"])  # the training weights too
    for i, s in whole["optimizer"]["state"].items():
        assert all(torch.equal(v, resumed["optimizer"]["state"][i][n]) for n, v in s.items() if torch.is_tensor(v))
