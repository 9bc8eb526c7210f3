"""The suite's own rules: CI runs the README's test command and it selects every test; `-m "not slow"` runs a test
of every test module but those named in ALL_SLOW with why; an empty parameter list fails instead of skipping."""
import ast
import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# test modules with no fast test at all, each with why none can stand for it (CPU seconds measured 2026-12-03)
ALL_SLOW: dict[str, str] = {
    "tests/engine/memory/test_memory_auto.py": "each test predicts full-size SDXL steps on the meta device (30-150 s)",
    "tests/engine/memory/test_memtrace_rss.py": "its one test trains a mid-size UNet twice in a child process (75 s)",
    "tests/engine/run/test_events.py": "each test trains the demo through the API, stopped or failed and resumed (12-23 s)",
    "tests/engine/run/test_timed_saves.py": "each test trains the demo for the saves a clock makes (7-9 s)",
    "tests/faults/test_overwrite_and_restart.py": "each test trains the demo, then overwrites or restarts its folder (5-13 s)",
    "tests/faults/test_resume_averaging.py": "each test resumes from a finished EMA run, 13 s of training to make",
    "tests/faults/test_run_folder.py": "each test trains in a child process, a folder refused only after a run (13-25 s)",
    "tests/package/test_embedding.py": "its one test runs the README's embedding example, stopped and resumed (35 s)",
    "tests/faults/test_kill_9.py": "its one test kills a real run 20 times and resumes it each time (about 4 min)",
    "tests/page/test_page_run.py": "each test drives headless Chromium against a live server training the demo (30-90 s)",
    "tests/page/test_page_token.py": "each test starts a live server and a browser (20-40 s)",
    "tests/serve/test_serve_bad_requests.py": "each test starts a live gesso serve and waits for its jobs' processes",
    "tests/serve/test_serve_crash.py": "each test trains a served job, kills the server and resumes it (3-4 min)",
    "tests/serve/test_serve_isolation.py": "its one test runs failing and killed jobs on a live server (about 4 min)",
    "tests/serve/test_serve_jobs.py": "its tests share one live server that trains three demo jobs (about 4 min)",
}


def fast_tests(path: Path) -> list[str]:
    """The test functions of a module that `-m "not slow"` keeps (by their decorators and the module's pytestmark;
    a function whose parameters are marked one by one counts as fast)."""
    tree = ast.parse(path.read_text())

    def slow(node) -> bool:
        return any(ast.unparse(d).startswith("pytest.mark.slow") for d in node.decorator_list)

    marks = [n.value for n in tree.body if isinstance(n, ast.Assign) and "pytestmark" in map(ast.unparse, n.targets)]
    if any("pytest.mark.slow" in ast.unparse(m) for m in marks):
        return []
    functions = [(n, None) for n in tree.body if isinstance(n, ast.FunctionDef)]
    functions += [(f, c) for c in tree.body if isinstance(c, ast.ClassDef) and c.name.startswith("Test")
                  for f in c.body if isinstance(f, ast.FunctionDef)]
    return [f.name for f, cls in functions if f.name.startswith("test") and not slow(f) and not (cls and slow(cls))]


def test_every_test_module_keeps_a_fast_test():
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py"))
    assert len(modules) > 50 and "tests/test_suite.py" in modules
    without = [m for m in modules if not fast_tests(ROOT / m) and m not in ALL_SLOW]
    assert not without, f'`-m "not slow"` would not import {without}: keep one fast test, or say why in ALL_SLOW'
    assert set(ALL_SLOW) <= set(modules), f"ALL_SLOW names modules that are gone: {sorted(set(ALL_SLOW) - set(modules))}"


def test_the_module_check_sees_slow_marks(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text("import pytest\n\n\n@pytest.mark.slow\ndef test_a():\n    pass\n\n\n"
                       "@pytest.mark.slow\nclass TestB:\n    def test_b(self):\n        pass\n\n\ndef test_c():\n    pass\n")
    assert fast_tests(planted) == ["test_c"]
    planted.write_text(planted.read_text().replace("def test_c", "@pytest.mark.slow()\ndef test_c"))
    assert fast_tests(planted) == []
    planted.write_text("import pytest\n\npytestmark = [pytest.mark.slow]\n\n\ndef test_d():\n    pass\n")
    assert fast_tests(planted) == []


def test_ci_runs_the_readme_test_command_and_it_selects_every_test():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"CI runs exactly this[^\n]*\n\n {4}(.+)\n", readme).group(1)
    assert (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == command
    pytest_args = shlex.split(command.split("&&")[-1])
    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    addopts = shlex.split(ini["pytest"].get("addopts", ""))
    # no marker or keyword selection on the command or by default: CI runs the slow tests too
    assert pytest_args[:3] == ["python", "-m", "pytest"]
    selecting = [a for a in pytest_args[3:] + addopts if a.startswith(("-m", "-k", "--deselect", "--ignore"))]
    assert not selecting, selecting
    assert "--strict-markers" in addopts and re.search(r"^\s*slow:", ini["pytest"]["markers"], re.M)
    assert '\n    python -m pytest -q -m "not slow"\n' in readme  # and the fast subset beside it


def test_a_parametrize_over_an_empty_list_fails_collection(tmp_path):
    # a table that comes out empty (a registry emptied, a glob that finds nothing) must not pass as a skip
    (tmp_path / "test_planted.py").write_text('import pytest\n\n\n@pytest.mark.parametrize("row", [])\n'
                                              "def test_a(row):\n    pass\n\n\ndef test_b():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(ROOT / "pytest.ini"), "--rootdir", str(tmp_path),
                           str(tmp_path / "test_planted.py")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Empty parameter set in 'test_a'" in proc.stdout, proc.stdout[-2000:]
