"""`pip install -e .` and `pip install .` into a fresh virtual environment leave one import name, `gesso`.

Each install goes into its own venv in tmp (`--system-site-packages`, so torch and the rest come from this
Python and nothing large is downloaded), built from a copy of the checkout: a plain build writes build/ and
gesso.egg-info into the tree it builds, and an editable install from a copy can be told apart from the
editable `gesso` this Python already has, which the venv also sees. The venvs have no pip of their own: this
Python's pip and setuptools (torch requires setuptools >= 77) install into them.
"""
import ast
import dataclasses
import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("commands", "engine", "kernels", "models", "serve")
BARE_NAMES = ("models", "engine", "kernels", "cli")  # our sub-packages as a host would name its own

# Printed as JSON by the venv's Python: the venv's own gesso distribution, read from its site-packages only.
RECORD_SCRIPT = """
import importlib.metadata, json, sys, sysconfig
site = sysconfig.get_paths()["purelib"]
dists = list(importlib.metadata.distributions(name="gesso", path=[site]))
assert len(dists) == 1, f"{len(dists)} gesso distributions in {site}"
print(json.dumps({"site": site, "files": [f.as_posix() for f in dists[0].files]}))
"""

# Imports in the venv from a neutral folder, before and after the package: the bare names must never resolve.
IMPORT_SCRIPT = """
import importlib, json, sys

def bare():
    found = {}
    for name in %r:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        found[name] = getattr(module, "__file__", repr(module))
    return found

before = bare()
import gesso, gesso.cli, gesso.engine.loop.train, gesso.engine.measure.bench
from gesso.models.configs import TINY_SDXL
from gesso.models.tokenizer import SHIPPED, load_tokenizers
ids = load_tokenizers(TINY_SDXL)[0]("a photo").input_ids
root = gesso.__file__.rsplit("/", 1)[0]
foreign = sorted(n for n, m in sys.modules.items()
                 if (getattr(m, "__file__", None) or "").startswith(root + "/") and n.split(".")[0] != "gesso")
print(json.dumps({"before": before, "after": bare(), "gesso": gesso.__file__, "foreign": foreign,
                  "tokenizer": str(SHIPPED), "ids": [ids[0], ids[-1]]}))
""" % (BARE_NAMES,)


@dataclasses.dataclass
class Install:
    source: Path  # the copy of the checkout it was built from
    python: Path  # the venv's interpreter
    site: Path  # the venv's site-packages
    files: list[str]  # the distribution's RECORD, relative to site-packages
    checkout_before: str  # the checkout's build outputs before and after (git_status)
    checkout_after: str


def git_status() -> str:
    """What a build in the checkout would leave there: build/, dist/, *.egg-info. Not the whole status, which also
    sees the edits of whoever works in the checkout while the tests run."""
    return subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--", "build/*", "dist/*",
                           "*.egg-info/*"], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def copy_checkout(dest: Path) -> Path:
    """The files git sees in the working tree (tracked, or new and not ignored), without build outputs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the working tree is listed but absent
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


def run(cmd: list, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def install(tmp: Path, editable: bool) -> Install:
    before = git_status()
    source = copy_checkout(tmp / "src")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # tests run in a venv: the new one would see the base Python's packages, not these
        purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
        lines = [f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages()]
        (Path(purelib) / "_outer_venv.pth").write_text("".join(lines))
    run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input", "--disable-pip-version-check", "-q",
         *(["-e"] if editable else []), "."], cwd=source)
    record = json.loads(run([python, "-c", RECORD_SCRIPT], cwd=tmp).stdout)
    return Install(source, python, Path(record["site"]), record["files"], before, git_status())


@pytest.fixture(scope="module")
def editable(tmp_path_factory) -> Install:
    return install(tmp_path_factory.mktemp("editable"), editable=True)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Install:
    return install(tmp_path_factory.mktemp("plain"), editable=False)


def is_editable_hook(name: str) -> bool:
    """setuptools' import hook for editable installs (a .pth that runs a finder module): not a name of ours."""
    return (name.startswith("__editable__.gesso-") and name.endswith(".pth")
            or name.startswith("__editable___gesso_") and name.endswith("_finder.py"))


def top_level_names(files: list[str]) -> set[str]:
    """The import names a RECORD puts in site-packages: first path component, less metadata and hooks."""
    names = set()
    for path in files:
        first = path.split("/")[0]
        if first == ".." or first == "__pycache__" or first.endswith(".dist-info") or is_editable_hook(first):
            continue  # outside site-packages (bin/gesso), bytecode, metadata, setuptools' editable hook
        names.add(first.removesuffix(".py").removesuffix(".pth"))
    return names


def finder_mapping(source: str) -> tuple[dict, dict]:
    """MAPPING (import name -> folder) and NAMESPACES of a setuptools editable finder module."""
    found = {}
    for node in ast.parse(source).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id in ("MAPPING", "NAMESPACES"):
            found[target.id] = ast.literal_eval(node.value)
    return found["MAPPING"], found.get("NAMESPACES", {})


def test_top_level_names_sees_a_stray_name():
    record = ["../../../bin/gesso", "gesso-0.1.0.dist-info/RECORD", "__editable__.gesso-0.1.0.pth",
              "__editable___gesso_0_1_0_finder.py", "__pycache__/__editable___gesso_0_1_0_finder.cpython-311.pyc",
              "gesso/__init__.py"]
    assert top_level_names(record) == {"gesso"}
    stray = ["models/__init__.py", "cli.py", "easy-install.pth"]
    assert top_level_names(record + stray) == {"gesso", "models", "cli", "easy-install"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["editable", "plain"])
def test_the_install_puts_one_name_in_site_packages(mode, request):
    inst = request.getfixturevalue(mode)
    hooks = sorted(f for f in inst.files if "/" not in f and is_editable_hook(f))
    assert len(hooks) == (2 if mode == "editable" else 0), hooks  # the .pth and the finder it runs
    names = top_level_names(inst.files)  # an editable install has no files of ours: its hook serves them
    for name in hooks:
        text = (inst.site / name).read_text()
        if name.endswith(".pth"):
            # a .pth line that is not an import adds a folder to sys.path: the checkout's root would expose `models`
            assert all(line.startswith("import ") for line in text.splitlines() if line.strip()), text
        else:
            mapping, namespaces = finder_mapping(text)
            assert mapping == {"gesso": str(inst.source)}
            assert all(n.split(".")[0] == "gesso" for n in namespaces), namespaces
            names |= set(mapping)
    assert names == {"gesso"}, sorted(inst.files)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["editable", "plain"])
def test_only_gesso_imports_from_the_install(mode, request, tmp_path):
    inst = request.getfixturevalue(mode)
    out = json.loads(run([inst.python, "-c", IMPORT_SCRIPT], cwd=tmp_path).stdout.splitlines()[-1])
    assert out["before"] == {} and out["after"] == {}, out  # `import models` etc. raise ModuleNotFoundError
    home = inst.source if mode == "editable" else inst.site / "gesso"
    assert Path(out["gesso"]) == home / "__init__.py"  # the venv's install, not this Python's
    assert out["foreign"] == []  # no module of the package is also loaded under a second name
    assert Path(out["tokenizer"]) == home / "models" / "tokenizers" / "clip"
    assert out["ids"] == [49406, 49407]  # CLIP's start and end tokens, from the shipped vocabulary


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["editable", "plain"])
def test_the_console_script_runs(mode, request, tmp_path):
    inst = request.getfixturevalue(mode)
    script = inst.python.parent / "gesso"
    assert str(inst.python) in script.read_text()  # the venv's script, run by the venv's Python
    out = run([script, "--help"], cwd=tmp_path).stdout
    assert out.startswith("usage: gesso") and all(c in out for c in ("train", "inspect", "bench", "memory"))


def test_the_plain_install_holds_the_package_and_nothing_else(plain):
    installed = {f.removeprefix("gesso/") for f in plain.files if f.startswith("gesso/") and "__pycache__" not in f}
    assert not {f for f in installed if f.split("/")[0] in ("tests", "benchmarks", "scripts", "examples", "setup.py")}
    src = plain.source
    modules = {p.name for p in src.glob("*.py") if p.name != "setup.py"}  # __init__, cli, errors
    modules |= {p.relative_to(src).as_posix() for d in PACKAGE_DIRS for p in (src / d).rglob("*.py")}
    tokenizer = {p.relative_to(src).as_posix() for p in (src / "models" / "tokenizers" / "clip").iterdir()}
    assert tokenizer == {"models/tokenizers/clip/merges.txt", "models/tokenizers/clip/vocab.json"}
    page = {p.relative_to(src).as_posix() for p in (src / "serve" / "static").rglob("*") if p.is_file()}  # gesso serve's page
    assert {"serve/static/index.html", "serve/static/app.js", "serve/static/vendor/uPlot.iife.min.js",
            "serve/static/vendor/uPlot.LICENSE.txt"} <= page
    data = tokenizer | page
    data |= {"kernels/dispatch_table.json"} if (src / "kernels" / "dispatch_table.json").is_file() else set()
    assert installed == modules | data  # every sub-package setup.py must list, its data files (the measured dispatch table once one exists), and nothing else
    for name in data:
        assert (plain.site / "gesso" / name).read_bytes() == (src / name).read_bytes()


def test_the_built_wheel_carries_the_dispatch_table(tmp_path):
    """kernels/dispatch_table.json (written by a GPU session, benchmarks/dispatch_table.py) ships in the wheel, where
    kernels/dispatch.py reads it beside itself; a stand-in table where the checkout has none yet."""
    source = copy_checkout(tmp_path / "src")
    table = source / "kernels" / "dispatch_table.json"
    if not table.is_file():
        row = {"use": "reference", "triton_ms": 0.2, "reference_ms": 0.1}
        table.write_text(json.dumps({"devices": {"NVIDIA H200": {"measured": {"date": "2026-12-03", "torch": "2.11.0"},
                                                                 "ops": {"attention": {"1-10-4096-64-77-bfloat16": row}}}}}))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-input", "--disable-pip-version-check",
         "-q", "-w", tmp_path / "dist", "."], cwd=source)
    (wheel,) = (tmp_path / "dist").glob("gesso-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("gesso/kernels/dispatch_table.json") == table.read_bytes()
        assert "gesso/kernels/dispatch.py" in z.namelist()


@pytest.mark.parametrize("mode", ["editable", "plain"])
def test_installing_leaves_the_checkout_as_it_was(mode, request):
    inst = request.getfixturevalue(mode)
    assert inst.checkout_after == inst.checkout_before
