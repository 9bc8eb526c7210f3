"""train.memory = "auto": on full-size SDXL at 1024 px each free-memory figure gets the fastest mode the
predictor says fits; when only block swap fits, the fewest blocks that do."""
from unittest import mock

import pytest

from gesso.engine.config.load import load_config
from gesso.engine.loop import inputs
from gesso.engine.memory import memplan, memtrace
from gesso.errors import ConfigError
from tests.engine.memory import memory_testutil
from tests.engine.loop.test_train import DEMO

ORDER = [(False, False, 0), (False, True, 0), (True, True, 0)]  # plain, checkpointing, fp8 bases + checkpointing


@pytest.fixture(scope="module")
def predicted():
    """The predictor, once per mode, and what it predicted by (fp8_base, gradient_checkpointing, blocks_to_swap)."""
    by_mode = {}

    def predict(cfg):
        t = cfg.train
        p = by_mode[(t.fp8_base, t.gradient_checkpointing, t.blocks_to_swap)] = memory_testutil.predict(cfg)
        return p

    return load_config(DEMO, memory_testutil.SDXL_1024 + ["train.memory='auto'"]), predict, by_mode


@pytest.mark.slow
@pytest.mark.parametrize("free", [24, 12, 8, 6, 4])
def test_each_free_figure_gets_the_first_mode_that_fits(predicted, free):
    cfg, predict, cache = predicted
    chosen, p = memplan.plan(cfg, free, predict)
    t = chosen.train
    mode = (t.fp8_base, t.gradient_checkpointing, t.blocks_to_swap)
    assert memplan.fits(p, free) and p is cache[mode] and t.memory == "manual" and t.mixed_precision == "bf16"
    faster = ORDER[:ORDER.index(mode)] if mode in ORDER else ORDER
    assert all(not memplan.fits(cache[m], free) for m in faster)  # every faster mode was predicted and does not fit
    if t.blocks_to_swap:  # one block fewer does not fit
        assert mode[:2] == (True, True) and not memplan.fits(predict(memtrace.with_mode(cfg, True, True, t.blocks_to_swap - 1)), free)


@pytest.mark.slow
def test_the_figures_spread_over_the_modes(predicted):
    cfg, predict, _ = predicted
    chosen = [memplan.plan(cfg, free, predict)[0].train for free in (24, 12, 8, 6, 4)]
    modes = [(t.fp8_base, t.gradient_checkpointing, t.blocks_to_swap) for t in chosen]
    assert modes == [(False, False, 0), (False, True, 0), (False, True, 0), (True, True, 0), (True, True, 0)], modes


@pytest.mark.slow
def test_when_only_block_swap_fits_the_fewest_blocks_that_fit_are_swapped():
    # on the demo's tiny model, where a prediction takes a second: a figure between the leanest mode without
    # swap and the one with every block swapped
    cfg = load_config(DEMO, ["train.memory='auto'"])
    predict = memory_testutil.predict
    lean = predict(memtrace.with_mode(cfg, True, True, 0))
    every = predict(memtrace.with_mode(cfg, True, True, memtrace.unit_count(cfg)))
    assert every.peak_gib < lean.peak_gib
    free = memplan.MARGIN_GIB + memplan.MARGIN_FACTOR * (lean.peak_gib + every.peak_gib) / 2
    chosen, p = memplan.plan(cfg, free, predict)
    n = chosen.train.blocks_to_swap
    assert chosen.train.fp8_base and chosen.train.gradient_checkpointing and 0 < n < memtrace.unit_count(cfg)
    assert memplan.fits(p, free) and not memplan.fits(predict(memtrace.with_mode(cfg, True, True, n - 1)), free)


@pytest.mark.slow
def test_training_prints_its_choice_and_a_card_too_small_is_one_line(predicted, capsys):
    cfg, predict, _ = predicted
    with mock.patch.object(memplan, "free_gib", return_value=6.0), mock.patch.object(memplan.memtrace, "predict", predict):
        chosen = inputs.auto_memory(cfg, None)
    assert chosen.train.fp8_base and chosen.train.gradient_checkpointing
    line = capsys.readouterr().out.strip()
    assert line.startswith("train.memory = auto: fp8 bases + bf16 + checkpointing, predicted peak ") and "of 6.00 GiB free" in line
    with pytest.raises(ConfigError, match=r"^train.memory = auto: no mode fits 0.50 GiB free"):
        memplan.plan(cfg, 0.5, predict)
