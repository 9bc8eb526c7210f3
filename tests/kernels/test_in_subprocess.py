"""Collected only when triton was imported before TRITON_INTERPRET could be set (see conftest.py)."""
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_kernel_suite_in_a_fresh_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE)],
                          cwd=HERE.parent.parent, env=env, capture_output=True, text=True, timeout=900)
    tail = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, f"kernel tests failed under TRITON_INTERPRET=1:\n{tail}"
    assert " passed" in tail and "skipped" not in tail, tail
