"""Every numeric config key is range-checked when the config loads: a value out of range, nan or inf is one
ConfigError line naming the key (exit 2 from the CLI, no traceback), and values at the edges of a range pass."""
import math
import re
from dataclasses import fields
from pathlib import Path

import pytest
from faults_testutil import DEMO, assert_one_line_error, assert_unchanged, gesso_cli, snapshot

from gesso.engine.config.load import build_config, load_config
from gesso.engine.config.sections import MAX_SEED, MAX_SIDE, Config
from gesso.errors import ConfigError

SIGNED = {("loss", "logit_mean")}  # a mean may be negative: refused past its range instead
NUMERIC = [(s.name, f.name, f.type) for s in fields(Config) for f in fields(s.default_factory)
           if f.type in (int, float) and (s.name, f.name) not in SIGNED]


def with_dataset(data: dict) -> dict:
    """`data` with the demo's images as dataset.path: build_config requires one, as load_config does."""
    return {**data, "dataset": {"path": str(DEMO.parent / "demo"), **data.get("dataset", {})}}


def refused(data: dict, *names: str) -> str:
    with pytest.raises(ConfigError) as caught:
        build_config(data, "run.toml")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("run.toml: ")
    for name in names:
        assert name in message, f"{name!r} not named in {message!r}"
    return message


@pytest.mark.parametrize("section, key, typ", NUMERIC, ids=[f"{s}.{k}" for s, k, _ in NUMERIC])
def test_every_numeric_key_refuses_minus_one_and_non_finite_values(section, key, typ):
    # -1 is out of range for every numeric key: a new key without a range fails here
    refused({section: {key: -1}}, f"{section}.{key} = -1")
    if typ is float:
        for value in (math.nan, math.inf, -math.inf):
            refused({section: {key: value}}, f"{section}.{key} = {value!r}", "finite")


BAD = [
    ("loss", "logit_mean", -10.5),
    ("loss", "logit_std", 0.0),
    ("network", "dropout", 1.0),  # dropout probabilities live in [0, 1)
    ("network", "rank_dropout", 1.0),
    ("train", "ema_decay", 1.0),
    ("dataset", "validation_split", 1.0),
    ("train", "learning_rate", 0.0),  # zero where a step size must move
    ("train", "adam_epsilon", 0.0),
    ("train", "adam_beta1", 1.0),  # betas live in [0, 1)
    ("train", "adam_beta2", 1.5),
    ("train", "epochs", 0),
    ("train", "batch_size", 0),
    ("train", "gradient_accumulation_steps", 0),
    ("train", "lr_scheduler_num_cycles", 0),
    ("train", "seed", MAX_SEED + 1),
    ("network", "rank", 0),
    ("network", "alpha", 0.0),
    ("network", "conv_alpha", 0.0),
    ("dataset", "resolution", 0),
    ("dataset", "resolution", 100),  # not a multiple of 64
    ("dataset", "resolution", MAX_SIDE * 2),  # a typo's extra digit
    ("dataset", "min_bucket_side", 32),
    ("dataset", "max_bucket_side", 2050),
    ("dataset", "caption_dropout_rate", 1.01),
    ("loss", "huber_c", 0.0),
    ("loss", "multires_noise_discount", 1.5),
    ("loss", "min_timestep", 1000),
    ("loss", "max_timestep", 1001),
    ("loss", "max_timestep", 0),
    ("sample", "steps", 0),
    ("sample", "seed", 2**40),
    ("model", "seed", MAX_SEED + 1),
]


@pytest.mark.parametrize("section, key, value", BAD, ids=[f"{s}.{k}={v}" for s, k, v in BAD])
def test_out_of_range_value_names_the_key(section, key, value):
    refused({section: {key: value}}, f"{section}.{key} = {value!r}")


GOOD = [
    ("train", "learning_rate", 1e-12),
    ("train", "text_encoder_lr", 0.0),  # 0: same as learning_rate
    ("train", "weight_decay", 0.0),
    ("train", "adam_beta1", 0.0),
    ("train", "adam_beta2", 0.9999),
    ("train", "max_grad_norm", 0.0),  # 0: no clipping
    ("train", "lr_warmup_steps", 0),
    ("train", "lr_scheduler_num_cycles", 1),
    ("train", "epochs", 1),
    ("train", "seed", 0),
    ("dataset", "repeats", 0),
    ("dataset", "resolution", 64),
    ("dataset", "resolution", MAX_SIDE),
    ("dataset", "keep_tokens", 0),
    ("dataset", "caption_dropout_rate", 0.0),
    ("dataset", "caption_dropout_rate", 1.0),
    ("network", "rank", 1),
    ("network", "conv_rank", 0),
    ("network", "alpha", 0.25),
    ("loss", "huber_c", 1e-6),
    ("loss", "min_snr_gamma", 0.0),
    ("loss", "noise_offset", 0.0),
    ("loss", "multires_noise_iterations", 0),
    ("loss", "multires_noise_discount", 1.0),
    ("loss", "min_timestep", 999),
    ("output", "keep_last", 0),
    ("output", "save_every_n_epochs", 0),
    ("output", "save_every_n_steps", 0),
    ("sample", "every_n_epochs", 0),
    ("sample", "steps", 1),
    ("sample", "cfg_scale", 0.0),
    ("sample", "seed", MAX_SEED),
    ("model", "seed", MAX_SEED),
]


@pytest.mark.parametrize("section, key, value", GOOD, ids=[f"{s}.{k}={v}" for s, k, v in GOOD])
def test_value_at_the_edge_is_accepted(section, key, value):
    cfg = build_config(with_dataset({section: {key: value}}))
    assert getattr(getattr(cfg, section), key) == value


@pytest.mark.parametrize("data, names", [
    ({"loss": {"min_timestep": 500, "max_timestep": 500}}, ["loss.min_timestep", "loss.max_timestep"]),
    ({"loss": {"min_timestep": 600, "max_timestep": 400}}, ["loss.min_timestep", "loss.max_timestep"]),
    ({"dataset": {"min_bucket_side": 1024, "max_bucket_side": 512}}, ["dataset.min_bucket_side", "dataset.max_bucket_side"]),
    ({"sample": {"prompts": ["a cat", 3]}}, ["sample.prompts"]),
])
def test_keys_that_must_agree_are_named_together(data, names):
    refused(data, *names)


def test_related_keys_at_their_edges_are_accepted():
    cfg = build_config(with_dataset({"loss": {"min_timestep": 0, "max_timestep": 1000},
                                     "dataset": {"min_bucket_side": 64, "max_bucket_side": 64}}))
    assert (cfg.loss.min_timestep, cfg.loss.max_timestep, cfg.dataset.max_bucket_side) == (0, 1000, 64)


@pytest.mark.parametrize("optimizer, args, names", [
    ("prodigy", {"d_coeff": 0.5}, ["train.optimizer_args.d_coeff", "accepted: beta3, d0, d_coef"]),  # a typo
    ("adamw", {"betas": [0.9, 0.99]}, ["train.optimizer_args.betas", "accepted: amsgrad"]),  # set by train.adam_beta1/2
    ("adafactor", {"lr": 0.1}, ["train.optimizer_args.lr", "accepted: beta1"]),  # set by train.learning_rate
    ("prodigy", {"d_coef": math.nan}, ["train.optimizer_args.d_coef = nan"]),
    ("prodigy", {"d_coef": -1.0}, ["train.optimizer_args", "d_coef=-1.0"]),  # refused by Prodigy's own check
    ("prodigy", {"d_coef": "big"}, ["train.optimizer_args", "'big'"]),
    ("adamw", {"foreach": True, "fused": True}, ["train.optimizer_args", "fused"]),
])
def test_bad_optimizer_args_are_named_before_any_model_loads(optimizer, args, names):
    refused({"train": {"optimizer": optimizer, "learning_rate": 1.0, "optimizer_args": args}}, *names)


@pytest.mark.parametrize("optimizer, args", [
    ("prodigy", {"d_coef": 0.5, "growth_rate": math.inf, "use_bias_correction": True}),  # inf is Prodigy's default growth
    ("adafactor", {"relative_step": True, "warmup_init": True, "beta1": 0.9}),
    ("adamw8bit", {"min_8bit_size": 0}),
    ("adamw", {"amsgrad": True}),
])
def test_good_optimizer_args_are_accepted(optimizer, args):
    assert build_config(with_dataset({"train": {"optimizer": optimizer, "optimizer_args": args}})).train.optimizer_args == args


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f'[dataset]\npath = "{DEMO.parent / "demo"}"\n{text}')
    return path


@pytest.mark.parametrize("text, name", [
    ("[train]\nlearning_rate = nan\n", "train.learning_rate = nan"),  # nan is a valid TOML float
    ("[network]\nalpha = inf\n", "network.alpha = inf"),
    ("[loss]\nnoise_offset = -inf\n", "loss.noise_offset = -inf"),
    ("[[dataset.subsets]]\npath = 'sub'\nrepeats = -2\n", "dataset.subsets[0].repeats = -2"),
])
def test_toml_file_values_are_checked(tmp_path, text, name):
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "run.toml"))) as caught:
        load_config(config_file(tmp_path, text))
    assert name in str(caught.value)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, names", [
    (["train.learning_rate=-1"], ["train.learning_rate = -1.0"]),
    (["train.learning_rate=nan"], ["train.learning_rate = nan"]),
    (["dataset.resolution=100"], ["dataset.resolution = 100"]),
    (["loss.min_timestep=900", "loss.max_timestep=100"], ["loss.min_timestep", "loss.max_timestep"]),
    (["train.optimizer='prodigy'", "train.optimizer_args={d_coeff=0.5}"], ["train.optimizer_args.d_coeff", "d_coef"]),
])
def test_cli_names_the_key_in_one_line(tmp_path, overrides, names):
    before = snapshot(DEMO.parent)
    out = tmp_path / "out"
    proc = gesso_cli("train", DEMO, "--output-dir", out, *[arg for item in overrides for arg in ("--set", item)])
    assert_one_line_error(proc, str(DEMO), *names)
    assert_unchanged(before)
    assert not out.exists(), "a refused config started a run"


@pytest.mark.slow
def test_cli_names_the_key_of_a_toml_file(tmp_path):
    path = config_file(tmp_path, "[network]\nalpha = inf\n")
    before = snapshot(tmp_path)
    assert_one_line_error(gesso_cli("train", path, "--output-dir", tmp_path / "out"), path, "network.alpha = inf")
    assert_unchanged(before)
    assert set(snapshot(tmp_path)) == set(before)
