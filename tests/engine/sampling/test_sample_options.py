"""kohya's per-prompt sample options (`--w --h --s --l --d --n --ss`) in `sample` and in training previews."""
from pathlib import Path

import pytest

from gesso import cli
from gesso.engine.config.load import load_config
from gesso.engine.loop.preview import preview_settings
from gesso.engine.sampling.options import PromptOptions, fit_side, split_options
from gesso.engine.sampling.sample import sample
from gesso.errors import ConfigError, PromptError

DEMO = Path(__file__).resolve().parents[3] / "tests" / "data" / "demo.toml"


@pytest.mark.parametrize("line, prompt, options", [
    ("a cat --w 832 --h 1216 --s 28 --l 6 --d 42 --n blurry, lowres",
     "a cat", PromptOptions(832, 1216, 28, 6.0, 42, "blurry, lowres")),  # the negative prompt runs to the line's end
    ("a cat --n ugly --ss k_euler_a --S 5000", "a cat", PromptOptions(steps=1000, negative_prompt="ugly", sampler="euler_a")),
    ("(a cat:1.2) <lora:demo:0.5>", "(a cat:1.2) <lora:demo:0.5>", PromptOptions()),  # no options: untouched
])
def test_options_are_split_from_the_prompt(line, prompt, options):
    assert split_options(line) == (prompt, options)


@pytest.mark.parametrize("line, named", [
    ("a cat --g 3.5", "--g in 'a cat --g 3.5': unknown sample option"),
    ("a cat --w wide", "--w 'wide' in 'a cat --w wide': expected a whole number"),
    ("a cat --ss heun", "--ss heun in 'a cat --ss heun': known samplers"),
    ("a cat --n", "--n in 'a cat --n': no value"),
])
def test_bad_options_are_one_line_naming_them(line, named):
    with pytest.raises(PromptError) as info:
        split_options(line)
    assert str(info.value).startswith(named)


def test_sizes_round_down_as_kohya_rounds():
    assert (fit_side(832, 32), fit_side(850, 32), fit_side(20, 32)) == (832, 832, 32)


def test_sample_takes_the_options_over_its_arguments():
    image, = sample("gssdemo, a red circle --w 70 --h 96 --s 2 --l 3.5 --d 11 --n blurry --ss euler", "tiny-sdxl",
                    negative_prompt="ignored", steps=9, sampler="ddim", seed=1, width=128, height=128, progress=False)
    assert image.size == (64, 96)  # 70 rounded down to the tiny UNet's multiple of 32
    text = image.info["parameters"]
    assert text.startswith("gssdemo, a red circle\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, ")
    assert "CFG scale: 3.5, Seed: 11, Size: 64x96" in text and "--" not in text


def test_preview_prompts_take_the_options_and_bad_ones_stop_the_config(tmp_path):
    cfg = load_config(DEMO, ['sample.prompts=["a --w 64 --h 96 --d 5 --s 3 --n dull", "b"]', "sample.seed=40"])
    first, second = preview_settings(cfg, 32)
    assert (first.prompt, first.width, first.height, first.seed, first.steps, first.negative_prompt) == ("a", 64, 96, 5, 3, "dull")
    assert (second.width, second.seed, second.steps) == (cfg.dataset.resolution, 41, cfg.sample.steps)  # [sample]'s own
    with pytest.raises(ConfigError, match=r"sample.prompts\[1\]: --wh in 'b --wh 3': unknown sample option"):
        load_config(DEMO, ['sample.prompts=["a", "b --wh 3"]'])


def test_sample_command_reads_the_options(tmp_path, capsys):
    args = ["sample", "--prompt", "gssdemo --w 64 --h 64 --s 1 --d 3", "--model", "tiny-sdxl", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert (tmp_path / "00000-3.png").is_file()  # the seed from --d names the file
