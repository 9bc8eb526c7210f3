"""The README's layout shows every folder of the package, each line importing only what it or the lines below it hold."""
import re
from pathlib import Path

from test_import_graph import folder_graph, import_graph, package_modules, packages_of

ROOT = Path(__file__).resolve().parents[2]


def layout_nodes() -> list[list[str]]:
    """The import-graph nodes each line of the README's layout names, top line first."""
    block = re.search(r"## Layout\n.*?```\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    lines = []
    for line in block.splitlines():
        names = re.split(r"\s{2,}", line.strip())[0] if not line.startswith(" " * 10) else ""
        if not names or names == "engine/":
            continue  # a description's second line, or the heading of engine's rooms
        prefix = "gesso.engine." if line.startswith("  ") else "gesso."
        nodes = []
        for name in names.split(", "):
            if name == "__init__.py":
                nodes.append("gesso")
            elif name.endswith("/"):
                nodes.append(prefix + name[:-1])
            else:  # a module: directly at the root its own node, in engine/ one of the foundations
                nodes.append(prefix.rstrip(".") if prefix == "gesso.engine." else prefix + name.removesuffix(".py"))
        lines.append(sorted(set(nodes)))
    return lines


def test_the_layout_shows_every_folder_and_imports_point_down_it():
    modules = package_modules()
    folders = folder_graph(import_graph(), packages_of(modules))
    lines = layout_nodes()
    rank = {node: i for i, nodes in enumerate(lines) for node in nodes}
    assert set(rank) == set(folders), f"not in the README's layout: {sorted(set(folders) - set(rank))}"
    upward = [(a, b) for a, deps in folders.items() for b in deps if rank[b] < rank[a]]  # a line may hold a layer
    assert not upward, f"imports that point up the README's layout: {upward}"
