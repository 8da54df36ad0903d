"""Imports only go downward: every module of the package imports from lower layers alone.

Reads each module's source (AST), so lazy imports inside functions count
too. The layers are the ones the package docstring lists; a module missing
from them fails the test, so a new module must be placed.
"""

import ast
from pathlib import Path

# read from the source tree, not imported: a cycle must fail here, not at collection
PACKAGE = Path(__file__).resolve().parents[1] / "pyro_vae"

#: Lowest first; a module may import from any module of a strictly lower layer.
LAYERS = [
    ["_version"],
    ["environment"],
    ["errors"],
    ["files"],
    ["plugins"],
    ["registry"],
    ["config"],
    ["nets"],
    ["likelihoods"],
    ["guides"],
    ["priors"],
    ["model"],
    ["elbo", "data", "weights"],
    ["objectives", "exact"],
    ["build"],
    ["checkpoint"],
    ["export"],
    ["distributed"],
    ["train"],
    ["em"],
    ["ais"],
    ["evaluate", "diagnostics"],
    ["plots"],
    ["report", "course", "tensorboard"],
    ["cli"],
    ["__init__"],
    ["__main__"],
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def imports_of(path: Path) -> set[str]:
    """The package modules that ``path`` imports (``from . import x``, ``from .x import y``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import x: module x, or a name of the package itself
                found.update(a.name if a.name in LEVEL else "__init__" for a in node.names)
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyro_vae")
        ):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(a.name if a.name in LEVEL else "__init__" for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pyro_vae":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == set(LEVEL), "place new modules in LAYERS (and the package docstring)"


def test_imports_only_go_downward():
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        me = path.stem
        for other in imports_of(path):
            if other in LEVEL and LEVEL[other] >= LEVEL[me] and other != me:
                upward.append(f"{me} imports {other}")
    assert not upward, upward


def test_the_import_graph_has_no_cycle():
    graph = {p.stem: imports_of(p) & set(LEVEL) for p in PACKAGE.glob("*.py")}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*stack, node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_checker_sees_lazy_and_absolute_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from .config import Config\n"
        "def f():\n    from . import train\n    import pyro_vae.plots\n"
        "    from pyro_vae.cli import main\n    from . import __version__\n"
    )
    assert imports_of(source) == {"config", "train", "plots", "cli", "__init__"}
