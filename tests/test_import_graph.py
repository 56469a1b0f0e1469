"""The package's import graph: no cycles (imports deferred into function bodies included), no module
using another module's private (`_name`) names, and layers: each package imports only from itself and the
packages below it (LAYERS, lowest first).

Every import statement anywhere in a module counts, wherever it sits (top level, function body, `if
TYPE_CHECKING`): a deferred import still ties the two modules together, it only hides the tie until run time.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "planner"


@dataclass
class ImportGraph:
    edges: dict[str, set[str]] = field(default_factory=dict)  # module -> modules it imports
    private_uses: list[str] = field(default_factory=list)  # "user:line imports owner._name"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package folder `root`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _with_parents(module: str, package: str) -> list[str]:
    """Importing a.b.c runs a/__init__, a/b/__init__ and a/b/c: each is an edge."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(len(package.split(".")), len(parts) + 1)]


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def import_graph(root: Path) -> ImportGraph:
    """Edges between the modules of the package at `root`, and every cross-module use of a private name."""
    package = root.name
    modules = module_names(root)
    graph = ImportGraph()

    def known(dotted: str) -> str:
        while dotted not in modules and "." in dotted:
            dotted = dotted.rsplit(".", 1)[0]
        return dotted

    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = graph.edges.setdefault(name, set())
        aliases: dict[str, str] = {}  # a local name bound to a package module: its private attributes count too
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == package or alias.name.startswith(package + "."):
                        target = known(alias.name)
                        targets.update(_with_parents(target, package))
                        if alias.asname:
                            aliases[alias.asname] = target
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(node, name, path.name == "__init__.py")
                if source != package and not source.startswith(package + "."):
                    continue
                for alias in node.names:
                    as_module = f"{source}.{alias.name}"
                    if as_module in modules:  # from package import module
                        targets.update(_with_parents(as_module, package))
                        aliases[alias.asname or alias.name] = as_module
                        continue
                    owner = known(source)
                    targets.update(_with_parents(owner, package))
                    if _is_private(alias.name) and owner != name:
                        graph.private_uses.append(f"{name}:{node.lineno} imports {owner}.{alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _is_private(node.attr)
                    and aliases.get(node.value.id, name) != name):
                graph.private_uses.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
        targets.discard(name)
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None: depth-first search, a back edge closes a cycle."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph(PACKAGE_ROOT).edges)
    assert cycle is None, "import cycle (deferred imports count): " + " -> ".join(cycle or [])


def test_no_module_uses_another_modules_private_names() -> None:
    uses = import_graph(PACKAGE_ROOT).private_uses
    assert not uses, "give these a public name in the module they belong to:\n" + "\n".join(uses)


# The pipeline's packages, lowest first: a module may import from its own package and those before it.
LAYERS = (
    "core",      # errors, units, text, safe_io, pages, rank: no planner imports beyond core
    "measure",   # the measurement library, the worker protocol, isolation, work directories
    "models",    # loading a model: sources, zoo, archive_scan, hf_folder
    "schemes",   # one file per quantization scheme
    "recipes",   # recipes as data, mixed-precision recipes
    "analysis",  # footprint, activations, scratch, inspection, pruning, training, sensitivity, artifact, evalhook
    "runtimes",  # rows, baseline, the Runtime interface and one package per runtime
    "plan",      # pipeline (run_plan, evaluate), mixed_plan
    "report",    # tables, plan.{csv,md,json,png}, the exported artifact
    "cli",       # commands, console, supervisor, watchdog
)
# Documented user-facing paths kept as re-exports: above every layer, so nothing in the package imports them.
SHIMS = frozenset({"planner.artifact"})


def layer_violations(edges: dict[str, set[str]], package: str, layers: tuple[str, ...],
                     shims: frozenset[str] = frozenset()) -> list[str]:
    """Every import of a package above the importer's own, and every module outside the declared layers."""
    def rank(module: str) -> int | None:
        if module in shims:
            return len(layers)
        top = module.split(".")[1] if "." in module else None
        return layers.index(top) if top in layers else None

    problems = []
    for module in sorted(edges):
        if module == package:
            continue
        own = rank(module)
        if own is None:
            problems.append(f"{module} is in no declared layer ({', '.join(layers)})")
            continue
        for target in sorted(edges[module]):
            theirs = rank(target) if target != package else -1
            if theirs is not None and theirs > own:
                problems.append(f"{module} imports {target}, a layer above its own")
    return problems


def test_each_package_imports_only_from_the_layers_below() -> None:
    problems = layer_violations(import_graph(PACKAGE_ROOT).edges, PACKAGE_ROOT.name, LAYERS, SHIMS)
    assert not problems, "layers, lowest first: " + " < ".join(LAYERS) + "\n" + "\n".join(problems)


def test_the_documented_artifact_path_still_loads() -> None:
    import planner.analysis.artifact
    import planner.artifact

    assert planner.artifact.load_artifact is planner.analysis.artifact.load_artifact


# ---- the checker itself, on a tiny package --------------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_a_deferred_import_closes_a_cycle(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "def f():\n    from pkg.high import g\n    return g\n",
        "pkg/high.py": "from pkg import low\n",
    })
    cycle = find_cycle(import_graph(root).edges)
    assert cycle is not None and set(cycle) == {"pkg.low", "pkg.high"}


@pytest.mark.parametrize("statement", ["from . import b", "from .b import x", "import pkg.sub.b",
                                       "import pkg.sub.b as bee", "from pkg.sub import b"])
def test_every_import_form_is_an_edge(tmp_path: Path, statement: str) -> None:
    root = _write(tmp_path, {"pkg/__init__.py": "", "pkg/sub/__init__.py": "",
                             "pkg/sub/a.py": f"def f():\n    {statement}\n", "pkg/sub/b.py": "x = 1\n"})
    assert "pkg.sub.b" in import_graph(root).edges["pkg.sub.a"]


def test_a_package_init_that_imports_its_user_is_a_cycle(tmp_path: Path) -> None:
    root = _write(tmp_path, {"pkg/__init__.py": "", "pkg/sub/__init__.py": "from pkg.sub import b\n",
                             "pkg/sub/b.py": "x = 1\n", "pkg/c.py": "from pkg.sub.b import x\n",
                             "pkg/sub/d.py": "from pkg.c import x\n"})
    edges = import_graph(root).edges
    assert "pkg.sub" in edges["pkg.c"]
    assert find_cycle(edges) is None
    (root / "sub" / "b.py").write_text("from pkg.c import x\n")
    assert find_cycle(import_graph(root).edges) is not None


def test_layered_imports_have_no_cycle(tmp_path: Path) -> None:
    root = _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "", "pkg/b.py": "from pkg import a\n",
                             "pkg/c.py": "import pkg.a\nfrom pkg.b import thing\n"})
    assert find_cycle(import_graph(root).edges) is None


def test_private_names_of_another_module_are_found(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "_hidden = 1\n__all__ = []\n",
        "pkg/b.py": ("def f():\n    from pkg.a import _hidden, __all__\n    return _hidden\n"
                     "from pkg import a as alias\nvalue = alias._hidden\n"),
        "pkg/c.py": "from pkg.a import __all__\n",
    })
    uses = import_graph(root).private_uses
    assert uses == ["pkg.b:2 imports pkg.a._hidden", "pkg.b:5 uses pkg.a._hidden"]


def test_an_import_from_a_higher_layer_is_found(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        "pkg/__init__.py": "", "pkg/low/__init__.py": "", "pkg/high/__init__.py": "",
        "pkg/low/a.py": "import os\n", "pkg/high/b.py": "from pkg.low import a\n",
        "pkg/shim.py": "from pkg.high.b import a\n",
    })
    layers = ("low", "high")
    assert layer_violations(import_graph(root).edges, "pkg", layers, frozenset({"pkg.shim"})) == []
    (root / "low" / "a.py").write_text("def f():\n    from pkg.high import b\n    return b\n")  # deferred counts
    (root / "low" / "c.py").write_text("from pkg import shim\n")
    (root / "flat.py").write_text("")
    assert layer_violations(import_graph(root).edges, "pkg", layers, frozenset({"pkg.shim"})) == [
        "pkg.flat is in no declared layer (low, high)",
        "pkg.low.a imports pkg.high, a layer above its own",
        "pkg.low.a imports pkg.high.b, a layer above its own",
        "pkg.low.c imports pkg.shim, a layer above its own",
    ]
