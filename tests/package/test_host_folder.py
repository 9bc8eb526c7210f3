"""A host tool's working folder holds its own models/, engine/, kernels/ and cli.py, first on its path.

From there the host's packages stay the host's, `import gesso` and training the demo through `gesso.train` work,
and so do the installed `gesso inspect`, `gesso memory` and `gesso bench --help`, none of which may pick up the
host's modules (the host's cli.py prints "host cli" when imported).
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "tests" / "data" / "demo.toml"
HOST_FILES = {
    "models/__init__.py": 'HOST = "models"\nStableDiffusion = None\n',
    "engine/__init__.py": 'HOST = "engine"\ntrain = None\n',
    "kernels/__init__.py": 'HOST = "kernels"\nlora_linear = None\n',
    "cli.py": 'print("host cli")\n\n\ndef main():\n    raise SystemExit("host cli main")\n',
}

# The host's script: its own packages first, then gesso's public API, then its packages again, then its cli.
HOST_SCRIPT = """
import json, sys
import engine, kernels, models
assert (models.HOST, engine.HOST, kernels.HOST) == ("models", "engine", "kernels")
import gesso
cfg = gesso.load_config(sys.argv[1], sys.argv[3:])
result = gesso.train(cfg, sys.argv[2], progress=False)
assert all(sys.modules[m.HOST] is m for m in (models, engine, kernels)), "gesso replaced a host package"
assert "cli" not in sys.modules, "gesso imported a bare `cli`"
import cli
print(json.dumps({"final": str(result.final), "gesso": gesso.__file__,
                  "host": [m.__file__ for m in (models, engine, kernels, cli)]}))
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("host")
    for name, text in HOST_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def run(cmd: list, host: Path) -> subprocess.CompletedProcess:
    """`cmd` in the host's folder with the host first on PYTHONPATH, as the host's own scripts run.

    One intra-op thread, as tests/conftest.py sets for this process: tiny models on shared cores stall with more."""
    path = os.pathsep.join(filter(None, [str(host), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    done = subprocess.run([str(c) for c in cmd], cwd=host, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def gesso_command() -> Path:
    script = Path(sys.executable).parent / "gesso"
    assert script.is_file(), f"no console script {script}: install the package with `pip install -e .`"
    return script


def run_gesso(args: list, host: Path) -> str:
    """An installed `gesso` command from the host's folder: it must succeed without touching the host's modules."""
    done = run([gesso_command(), *args], host)
    out = done.stdout + done.stderr
    assert "host cli" not in out and "Traceback" not in out and "error:" not in out, out[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def trained(host, tmp_path_factory) -> dict:
    """The demo trained by the host's script: one epoch, one repeat (3 steps), no previews, caches in tmp."""
    tmp = tmp_path_factory.mktemp("demo")
    overrides = ["train.epochs=1", "dataset.repeats=1", "sample.prompts=[]", "output.tensorboard=false",
                 f"dataset.cache_dir={json.dumps(str(tmp / 'cache'))}"]
    done = run([sys.executable, "-c", HOST_SCRIPT, DEMO, tmp / "out", *overrides], host)
    return {**json.loads(done.stdout.splitlines()[-1]), "stdout": done.stdout, "out": tmp / "out"}


@pytest.mark.slow
def test_the_host_keeps_its_packages_and_trains_the_demo_with_gesso(host, trained):
    assert trained["host"] == [str(host / n) for n in ("models/__init__.py", "engine/__init__.py", "kernels/__init__.py",
                                                      "cli.py")]
    assert trained["gesso"] == importlib.util.find_spec("gesso").origin  # the installed gesso, as here
    assert trained["stdout"].count("host cli") == 1  # the host's own `import cli`, and gesso never imported it
    final = Path(trained["final"])
    assert final == trained["out"] / "demo.safetensors" and final.is_file()
    with safe_open(final, "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)


@pytest.mark.slow
def test_gesso_inspect_from_the_host(host, trained):
    with safe_open(trained["final"], "pt") as f:
        modules = sum(k.endswith(".lora_down.weight") for k in f.keys())
    out = run_gesso(["inspect", trained["final"]], host)
    assert f"LoRA, {modules} modules" in out and f"rank: {{8: {modules}}}" in out, out  # network.rank = 8 in demo.toml
    assert "module names: all match" in out


@pytest.mark.slow
def test_gesso_memory_from_the_host(host):
    out = run_gesso(["memory", DEMO], host)
    peak = re.search(r"peak (\d+\.\d+) GiB", out)
    assert peak and float(peak.group(1)) > 0, out


def test_gesso_bench_help_from_the_host(host):
    out = run_gesso(["bench", "--help"], host)
    assert out.startswith("usage: gesso bench") and "--matrix" in out
