"""A training run never dies of a Triton failure: the tests' demo (tiny-sdxl, shortened to three steps at 64 px, with
the 8-bit optimizer on every LoRA tensor of 256 elements or more) under `auto` dispatch, with CompilationError,
PTXASError or OutOfResources raised at every kernel's launch, finishes with one warning line per kernel and the LoRA
of a run on the reference path, within the parity tolerance. On this CPU `dispatch._auto_kernel` is stubbed so that
`auto` sends the tensors to the (interpreted) kernels, as it sends a GPU's."""
from pathlib import Path

import pytest
import torch

from gesso.engine.config.load import load_config
from gesso.engine.lora.files import read_lora
from gesso.engine.loop.train import train
from gesso.kernels import adamw8bit, attention, dispatch, fallback, lora_linear
from test_fallback import ERRORS, Failing

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo.toml"
SETS = ["train.epochs=1", "dataset.repeats=1", "dataset.resolution=64", "sample.prompts=[]", "output.tensorboard=false",
        "output.save_every_n_epochs=0", "train.optimizer='adamw8bit'", "train.optimizer_args={min_8bit_size=256}",
        "train.device='cpu'"]  # on a GPU machine too: the failing launches are stand-ins, the run is the CPU's
MODULES = (lora_linear, attention, adamw8bit)


def _run(out: Path, cache: Path) -> dict:
    result = train(load_config(DEMO, [*SETS, f"dataset.cache_dir='{cache}'"]), out, progress=False)
    assert result.step == 3 and result.final.is_file()
    return read_lora(result.final)[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> dict:
    with pytest.MonkeyPatch.context() as m:
        m.setenv(dispatch.ENV_VAR, "reference")
        return _run(tmp_path_factory.mktemp("reference"), cache)


@pytest.mark.parametrize("error", ERRORS)
def test_a_demo_run_finishes_on_the_references_when_every_kernel_fails(error, reference, cache, tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(dispatch, "_auto_kernel", lambda *args: True)
    monkeypatch.setattr(fallback, "_switched", set())
    failing = {}
    for module in MODULES:
        for name in [n for n in vars(module) if n.endswith("_kernel")]:
            failing[name] = Failing(ERRORS[error]())
            monkeypatch.setattr(module, name, failing[name])
    lora = _run(tmp_path / "run", cache)
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gesso: warning: Triton kernel")]
    assert sorted(line.split()[4] for line in warned) == ["adamw8bit", "attention", "lora_linear"]  # one line each
    assert all(f"cannot run on CPU: {error}: " in line for line in warned)
    assert failing["_lora_linear_fwd_kernel"].launches == 1 and failing["_adamw8bit_kernel"].launches == 1
    assert lora.keys() == reference.keys()
    for key, ref in reference.items():  # the fp32 parity tolerance of tests/kernels
        torch.testing.assert_close(lora[key], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())

