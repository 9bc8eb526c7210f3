"""The package's imports point one way: walk every module's import statements with `ast` and fail on any cycle.

Imports inside functions count too, so a cycle cannot be dodged by importing late.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("commands", "engine", "kernels", "models")


def module_name(path: Path) -> str:
    parts = ["gesso", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    files = [ROOT / "__init__.py", ROOT / "cli.py", ROOT / "errors.py"]
    files += [p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py")]
    return {module_name(p): p for p in files}


def imported(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The project modules a module imports: `from a.b import c` is a.b.c where c is a module, else a.b."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "gesso":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
    return out & set(modules)


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported(ast.parse(path.read_text(), str(path)), modules) for name, path in modules.items()}


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
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "gesso.engine.loop.train" in graph and "gesso.cli" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_walk_finds_a_cycle_when_there_is_one():
    # the cycle the layout removed: lora network -> formats -> files -> network
    graph = {"a.network": {"a.formats"}, "a.formats": {"a.files"}, "a.files": {"a.network"}, "a.names": set()}
    assert find_cycle(graph) == ["a.files", "a.network", "a.formats", "a.files"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_level_imports_are_edges_too():
    tree = ast.parse("def f():\n    from gesso.engine import train\n")
    assert imported(tree, {"gesso.engine.loop.train": Path(), "gesso.engine": Path()}) == {"gesso.engine.loop.train"}
