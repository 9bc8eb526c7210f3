"""The package's imports point one way: walk every module's import statements with `ast` and fail on any cycle,
between modules and between folders.

Imports inside functions count too, so a cycle cannot be dodged by importing late; relative imports
(`from . import x`, `from ..run import state`) count as the absolute imports they stand for.

The folder graph has one node per package folder (`gesso.engine` for the foundations directly in engine/,
`gesso.engine.loop`, `gesso.engine.run`, ..., `gesso.kernels`, `gesso.models`, `gesso.commands`, `gesso.serve`) and one per module
at the repository root (`gesso`, `gesso.cli`, `gesso.errors`): the root holds the entry points, which import
everything, and errors.py, which everything imports, so as one node it would be a cycle by construction. A folder
depends on another when any of its modules imports any of the other's; that graph must have no cycle either, so the
rooms read as layers: a room never needs a room that needs it.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("commands", "engine", "kernels", "models", "serve")


def module_name(path: Path) -> str:
    parts = ["gesso", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    files = [ROOT / "__init__.py", ROOT / "cli.py", ROOT / "errors.py"]
    files += [p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py")]
    return {module_name(p): p for p in files}


def absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The module `from ... import` reads from, as an absolute name: a relative import (level > 0) counts up from the
    package of `name` (itself when `name` is a package's __init__)."""
    if node.level == 0:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported(tree: ast.AST, modules: dict[str, Path], name: str = "", is_package: bool = False) -> set[str]:
    """The project modules module `name` imports: `from a.b import c` is a.b.c where c is a module, else a.b."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node, name, is_package)
            if source.split(".")[0] != "gesso":
                continue
            for a in node.names:
                sub = f"{source}.{a.name}"
                out.add(sub if sub in modules else source)
    return out & set(modules)


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported(ast.parse(path.read_text(), str(path)), modules, name, path.name == "__init__.py")
            for name, path in modules.items()}


def folder(name: str, packages: set[str]) -> str:
    """The folder node of module `name`: its package (a package's __init__ is its own folder), or the module itself
    directly at the repository root."""
    if name in packages:
        return name
    parent = name.rsplit(".", 1)[0]
    return name if parent == "gesso" else parent


def folder_graph(graph: dict[str, set[str]], packages: set[str]) -> dict[str, set[str]]:
    out = {}
    for name, deps in graph.items():
        node = folder(name, packages)
        out.setdefault(node, set()).update(folder(d, packages) for d in deps)
        out[node].discard(node)
    return out


def packages_of(modules: dict[str, Path]) -> set[str]:
    return {name for name, path in modules.items() if path.name == "__init__.py" and name != "gesso"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None; depth-first with an explicit stack."""
    state = {}  # module -> "open" while on the current path, "done" after
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = "open"
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = "done"
                stack.pop()
            elif state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = "open"
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "gesso.engine.loop.train" in graph and "gesso.cli" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_folders_have_no_import_cycle():
    modules = package_modules()
    folders = folder_graph(import_graph(), packages_of(modules))
    # the walk found the rooms, and the edges between them that the layout promises
    assert {"gesso.engine", "gesso.engine.loop", "gesso.engine.run", "gesso.kernels", "gesso.commands"} <= set(folders)
    assert "gesso.engine.run" in folders["gesso.engine.loop"] and "gesso.kernels" in folders["gesso.models"]
    cycle = find_cycle(folders)
    assert cycle is None, "import cycle between folders: " + " -> ".join(cycle)


def test_the_walk_finds_a_cycle_when_there_is_one():
    # the cycle the layout removed: lora network -> formats -> files -> network
    graph = {"a.network": {"a.formats"}, "a.formats": {"a.files"}, "a.files": {"a.network"}, "a.names": set()}
    assert find_cycle(graph) == ["a.files", "a.network", "a.formats", "a.files"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_cycle_between_folders_is_found_though_no_module_cycle_is():
    # a foundation importing a room that imports another foundation: no module imports itself back, but the folders
    # engine -> engine.run -> engine go round
    graph = {"gesso.engine.io": {"gesso.engine.run.state"}, "gesso.engine.run.state": {"gesso.engine.diffusion"},
             "gesso.engine.diffusion": set(), "gesso.errors": set(), "gesso.cli": {"gesso.errors"}}
    packages = {"gesso.engine", "gesso.engine.run"}
    assert find_cycle(graph) is None
    folders = folder_graph(graph, packages)
    assert folders == {"gesso.engine": {"gesso.engine.run"}, "gesso.engine.run": {"gesso.engine"}, "gesso.errors": set(),
                       "gesso.cli": {"gesso.errors"}}
    assert find_cycle(folders) == ["gesso.engine", "gesso.engine.run", "gesso.engine"]


def test_function_level_imports_are_edges_too():
    tree = ast.parse("def f():\n    from gesso.engine.loop import train\n")
    modules = {"gesso.engine.loop.train": Path(), "gesso.engine.loop": Path()}
    assert imported(tree, modules) == {"gesso.engine.loop.train"}


def test_relative_imports_are_edges_too():
    modules = {m: Path() for m in ("gesso.engine.loop", "gesso.engine.loop.train", "gesso.engine.loop.objective",
                                   "gesso.engine.run.state", "gesso.engine.run", "gesso.engine.io", "gesso.errors")}
    tree = ast.parse("from . import objective\nfrom ..run.state import load_state\nfrom .. import io\n"
                     "def f():\n    from ...errors import TrainError\n")
    assert imported(tree, modules, "gesso.engine.loop.train") == {
        "gesso.engine.loop.objective", "gesso.engine.run.state", "gesso.engine.io", "gesso.errors"}
    # in a package's __init__, `.` is the package itself
    assert imported(ast.parse("from .train import train\n"), modules, "gesso.engine.loop", is_package=True) == {
        "gesso.engine.loop.train"}
