"""The optimizers taken from libraries (schedule-free AdamW, CAME, Lion): a step through the registry is the library's
own step, `gesso memory` counts their states, LoRA+ gives the up matrices ratio x lr, and a missing package is one
line naming the extra."""
import importlib
from pathlib import Path
from unittest import mock

import pytest
import torch
from pytorch_optimizer import CAME, Lion
from schedulefree import AdamWScheduleFree

from gesso.engine.config.load import load_config
from gesso.engine.lora import network as lora
from gesso.engine.memory import memtrace
from gesso.engine.memory.network_setup import param_groups, train_optimizer
from gesso.engine.optim import build_optimizer
from gesso.errors import ConfigError

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo.toml"
# (name, the library's class, the keywords the registry hands it from the train section's defaults)
LIBRARIES = [
    ("adamw_schedulefree", AdamWScheduleFree, dict(betas=(0.9, 0.999), eps=1e-8)),
    ("came", CAME, {}),  # its own three betas and two epsilons
    ("lion", Lion, {}),  # its own betas (0.9, 0.99)
]


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(7, 5, generator=g)), torch.nn.Parameter(torch.randn(11, generator=g))]


@pytest.mark.parametrize("name, cls, moments", LIBRARIES, ids=[n for n, _, _ in LIBRARIES])
def test_a_step_is_the_librarys_own_on_the_same_gradients(name, cls, moments):
    ours, theirs = _params(0), _params(0)
    opt = build_optimizer(name, ours, 3e-3, 0.01, adam_betas=(0.9, 0.999), adam_eps=1e-8)
    ref = cls(theirs, lr=3e-3, weight_decay=0.01, **moments)
    if name == "adamw_schedulefree":
        ref.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert not torch.equal(a, _params(0)[0] if a.dim() == 2 else _params(0)[1])  # it moved


def test_optimizer_args_reach_the_library():
    opt = build_optimizer("lion", _params(0), 1e-4, 0.0, adam_betas=(0.9, 0.999), adam_eps=1e-8)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)  # Lion keeps its own betas, not Adam's 0.999
    cfg = load_config(DEMO, ["train.optimizer='lion'", "train.optimizer_args={betas = [0.95, 0.98]}"])
    assert tuple(build_optimizer("lion", _params(0), 1e-4, 0.0, **cfg.train.optimizer_args).param_groups[0]["betas"]) == (0.95, 0.98)
    with pytest.raises(ConfigError, match="train.optimizer_args.warmup_steps"):
        load_config(DEMO, ["train.optimizer='came'", "train.optimizer_args={warmup_steps = 3}"])


def test_a_missing_package_is_one_line_naming_the_extra():
    real = importlib.import_module

    def without_schedulefree(module, *args):
        if module == "schedulefree":
            raise ImportError("No module named 'schedulefree'")
        return real(module, *args)

    with mock.patch.object(importlib, "import_module", without_schedulefree), pytest.raises(ConfigError) as caught:
        load_config(DEMO, ["train.optimizer='adamw_schedulefree'"])
    assert "pip install 'gesso[optimizers]'" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.slow
def test_memory_counts_each_optimizers_state():
    # the states per LoRA parameter: AdamW and schedule-free two full copies (exp_avg and exp_avg_sq; z and
    # exp_avg_sq), Lion one (exp_avg), CAME one and its factored second moments (rows + columns, far less)
    counted = {}
    for name in ("adamw", "adamw_schedulefree", "lion", "came"):
        p = memtrace.predict(load_config(DEMO, [f"train.optimizer='{name}'"]))
        counted[name] = p.optimizer_gib / (p.trainable_gib / 2)  # trainable counts the parameters and their gradients
    assert counted["adamw"] == pytest.approx(2, rel=0.01)
    assert counted["adamw_schedulefree"] == pytest.approx(2, rel=0.01)
    assert counted["lion"] == pytest.approx(1, rel=0.01)
    assert 1 < counted["came"] < 2


@pytest.mark.parametrize("overrides, unet_ratio, te_ratio", [
    (["network.loraplus_lr_ratio=16"], 16, 16),
    (["network.loraplus_lr_ratio=16", "network.loraplus_unet_lr_ratio=4"], 4, 16),  # a part's own ratio wins
    (["network.loraplus_text_encoder_lr_ratio=8"], 0, 8),
])
def test_loraplus_gives_the_up_matrices_ratio_times_lr(overrides, unet_ratio, te_ratio):
    cfg = load_config(DEMO, ["network.train_text_encoders=true", "train.text_encoder_lr=5e-4", *overrides])
    unet = lora.LoRALinear(torch.nn.Linear(6, 4), 2, 2)
    te = lora.LoRALinear(torch.nn.Linear(6, 4), 2, 2)
    network = lora.LoRANetwork({"lora_unet_a": unet, "lora_te1_b": te}, {})
    groups = param_groups(network, cfg.train, cfg.network)
    by_param = {id(p): g["lr"] if "lr" in g else cfg.train.learning_rate for g in groups for p in g["params"]}
    lr, te_lr = cfg.train.learning_rate, 5e-4
    assert by_param[id(unet.lora_down)] == lr and by_param[id(te.lora_down)] == te_lr
    assert by_param[id(unet.lora_up)] == lr * (unet_ratio or 1)
    assert by_param[id(te.lora_up)] == pytest.approx(te_lr * (te_ratio or 1))
    assert len(by_param) == 4  # every tensor in exactly one group
    opt = train_optimizer(network, cfg.train, cfg.network)
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in groups]
