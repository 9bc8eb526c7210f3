"""The README's Python API example, run as a host runs it: a script in a folder outside the repository that trains
the demo through `gesso.train` with the progress bar off, writes every event with json.dumps, stops at step 5 from
its callback, and resumes.

The resumed run's final file must equal, tensor for tensor, the file of a run that was never stopped.
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gesso
from gesso.engine.lora.files import read_lora

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"  # the README names its demo.toml


def readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("### Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_stops_and_resumes_to_the_uninterrupted_file(tmp_path):
    code = readme_example()
    overrides = ast.literal_eval(re.search(r"gesso\.load_config\(sys\.argv\[1\], (\[.*?\])\)", code, re.S).group(1))
    host = tmp_path / "host"
    host.mkdir()
    (host / "embed.py").write_text(code)
    # a copy of the clone's examples, so that the run's latent cache (beside the images) stays out of the repository
    DEMO = shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns(".gesso_cache")) / "demo.toml"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread, as this process: the same float sums, bit for bit
    proc = subprocess.run([sys.executable, "embed.py", str(DEMO)], cwd=host, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    steps = [(int(s), int(n)) for s, n in re.findall(r"^step (\d+)/(\d+) epoch", proc.stdout, re.M)]
    total = steps[0][1]
    assert total == 12 and steps == [(s, total) for s in range(1, total + 1)]  # every step once, each with total_steps
    assert "stopped early: True at step 5" in proc.stdout
    first, second = proc.stdout.split("stopped early:")
    assert re.search(r"^saved state .*state\.pt$", first, re.M)  # the stop saved the state, and said so
    assert re.findall(r"^saved epoch .*demo-00000(\d)\.safetensors$", second, re.M) == ["1", "2"]
    assert re.search(r"^saved final .*demo\.safetensors$", second, re.M)
    assert "\r" not in proc.stderr and "%|" not in proc.stderr  # no progress bar
    # the host wrote every event with json.dumps: both runs' starts, all 12 steps once, and each kind of file saved
    events = [json.loads(line) for line in (host / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "start"] == [0, 5]
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 13))
    assert {e["kind"] for e in events if e["event"] == "save"} == {"state", "epoch", "final"}

    final = Path(re.search(r"^final: (.*)$", proc.stdout, re.M).group(1))
    resumed = read_lora(host / final)[0]
    whole = gesso.train(gesso.load_config(DEMO, overrides), tmp_path / "whole", progress=False)
    reference = read_lora(whole.final)[0]
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), "the resumed run's file differs"
