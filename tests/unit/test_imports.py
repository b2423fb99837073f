"""The import structure of ``layerlens/``: no import circle of any length, and never streamlit.

The graph is read with ``ast`` (nothing is imported): absolute ``layerlens.x`` and relative ``.x``/``..x``
imports, ``from . import x``, ``importlib.import_module("layerlens.x")`` with a literal name, imports
inside functions (they still tie the modules together), but not those under ``if TYPE_CHECKING:``.

Packages follow Python's rules: in ``p/__init__.py`` a level-1 relative import means ``p`` itself, and
importing ``p.m`` from outside ``p`` also runs ``p/__init__.py``, so it is an edge to ``p`` too. An import
of a package a module lives in (``from . import __version__``) is no edge: that package is always
initialised first.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIR = REPO / "layerlens"


@dataclass(frozen=True)
class Edge:
    """Why ``source`` depends on ``target``: the import statement, where, and how."""

    source: str
    target: str
    file: str
    line: int
    statement: str
    local: bool  # inside a function
    via_package: bool  # ``target`` is a package whose __init__ runs to import one of its submodules

    def describe(self) -> str:
        how = " (inside a function)" if self.local else ""
        if self.via_package:
            how += f" (runs {self.target.replace('.', '/')}/__init__.py)"
        return f"{self.file}:{self.line} `{self.statement}`{how}"


# ------------------------------------------------------------------------------------------ the walker


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module and package under ``package_dir``."""
    root = package_dir.parent
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if any(p == "__pycache__" or not p.isidentifier() for p in parts):
            continue
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Every import statement of one module, as (node, imported names, inside a function)."""

    def __init__(self) -> None:
        self.found: list[tuple[ast.AST, list[str], bool]] = []
        self._depth = 0

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # only for type checkers: the body never runs
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node, [a.name for a in node.names], self._depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node, [], self._depth > 0))  # resolved against the module's package later

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self.found.append((node, [node.args[0].value], self._depth > 0))
        self.generic_visit(node)


def _from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by ``from <level dots><node.module> import ...`` inside ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    up = node.level - 1
    if up > len(base) - 1:
        raise ValueError(f"relative import beyond the top package in {module}")
    base = base[: len(base) - up] if up else base
    return ".".join(base + ([node.module] if node.module else []))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges(package_dir: Path) -> list[Edge]:
    """Every internal import edge of the package, with the statement that makes it."""
    files = module_files(package_dir)
    edges: list[Edge] = []
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        visitor = _Imports()
        visitor.visit(tree)
        own_packages = set(_ancestors(module)) | ({module} if is_package else set())
        for node, names, local in visitor.found:
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = _from_base(module, is_package, node)
                targets.append(base)
                targets += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
            else:
                targets += names
            for target in targets:
                if target not in files:
                    continue
                reached = [(target, False)] + [(a, True) for a in _ancestors(target) if a in files]
                for dst, via_package in reached:
                    if dst == module or dst in own_packages:
                        continue
                    edges.append(Edge(module, dst, str(path.relative_to(package_dir.parent)), node.lineno,
                                      ast.unparse(node).replace("\n", " "), local, via_package))
    return edges


def import_graph(edges: list[Edge]) -> dict[str, dict[str, Edge]]:
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)  # the first statement that makes the edge
        graph.setdefault(e.target, {})
    return graph


def strongly_connected(graph: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """The components of more than one module (Tarjan), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def shortest_cycle(graph: dict[str, dict[str, Edge]], component: list[str]) -> list[str]:
    """The shortest cycle through the component's first module, staying inside the component (BFS)."""
    members, start = set(component), component[0]
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        if v != start and start in graph[v]:
            path = [v]
            while path[-1] != start:
                path.append(parent[path[-1]])
            return path[::-1] + [start]
        for w in sorted(graph[v]):
            if w in members and w not in parent and w != start:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"{component} is not a cycle")


def find_cycles(graph: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component: every circle shows up, whatever its length."""
    return [shortest_cycle(graph, comp) for comp in strongly_connected(graph)]


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, Edge]]) -> str:
    steps = [f"  {a} -> {b}: {graph[a][b].describe()}" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


# ------------------------------------------------------------------------------------------ the package


def test_layerlens_has_no_import_cycle():
    graph = import_graph(import_edges(PACKAGE_DIR))
    problems = []
    for comp in strongly_connected(graph):
        cycle = shortest_cycle(graph, comp)
        problems.append(describe_cycle(cycle, graph))
        if len(comp) > len(cycle) - 1:
            problems.append(f"  (all modules of this circle: {', '.join(comp)})")
    assert not problems, "import cycle(s) in layerlens/:\n" + "\n".join(problems)


def test_the_walker_sees_the_whole_package():
    """Guards the test above against passing on an empty graph."""
    files = module_files(PACKAGE_DIR)
    on_disk = [p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts]
    assert len(files) == len(on_disk) and "layerlens" in files and "layerlens.capture" in files
    graph = import_graph(import_edges(PACKAGE_DIR))
    assert "layerlens.adapters" in graph["layerlens.capture"]  # from .adapters import decoder_layers
    assert "layerlens.errors" in graph["layerlens.adapters"]  # from .errors import ...
    assert "layerlens.runs" not in graph["layerlens.runs"]
    assert "layerlens" not in {t for targets in graph.values() for t in targets}  # always initialised first
    assert sum(len(t) for t in graph.values()) > 2 * len(files)


def _streamlit_imports(package_dir: Path) -> list[str]:
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):  # everything, TYPE_CHECKING and function bodies included
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if fname in ("import_module", "__import__"):
                    names = [str(node.args[0].value)]
            if any(n == "streamlit" or n.startswith("streamlit.") for n in names):
                found.append(f"{path.relative_to(package_dir.parent)}:{node.lineno} `{ast.unparse(node)}`")
    return found


def test_layerlens_never_imports_streamlit():
    found = _streamlit_imports(PACKAGE_DIR)
    assert not found, "layerlens/ imports streamlit (only app.py and pages/ may):\n" + "\n".join(found)


def test_importing_every_module_loads_no_streamlit():
    """At run time too: no module pulls streamlit in through a third-party import."""
    names = [m for m in module_files(PACKAGE_DIR) if not m.endswith("__main__")]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "print('streamlit' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------ the walker itself


def _make_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / next(iter(files)).split("/")[0]


def _cycles(root: Path, files: dict[str, str]) -> tuple[list[list[str]], dict]:
    graph = import_graph(import_edges(_make_package(root, files)))
    return find_cycles(graph), graph


def test_walker_finds_a_long_cycle_through_every_import_form(tmp_path):
    cycles, graph = _cycles(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import pkg.b\n",
        "pkg/b.py": "from .c import thing\n",
        "pkg/c.py": "from . import d\n",
        "pkg/d.py": "def f():\n    from pkg import a\n    return a\n",  # function-local
        "pkg/e.py": "from pkg.a import x\n",  # outside the cycle
    })
    assert cycles == [["pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.a"]]
    assert graph["pkg.d"]["pkg.a"].local and not graph["pkg.c"]["pkg.d"].local
    text = describe_cycle(cycles[0], graph)
    assert "pkg.a -> pkg.b -> pkg.c -> pkg.d -> pkg.a" in text
    assert "pkg/d.py:2 `from pkg import a` (inside a function)" in text


def test_walker_finds_a_pair_and_reports_each_component(tmp_path):
    cycles, _ = _cycles(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/x.py": "from .y import f\n",
        "pkg/y.py": "import importlib\ndef g():\n    return importlib.import_module('pkg.x')\n",
        "pkg/p.py": "from . import q\n",
        "pkg/q.py": "from .p import h\n",
    })
    assert cycles == [["pkg.p", "pkg.q", "pkg.p"], ["pkg.x", "pkg.y", "pkg.x"]]


def test_walker_ignores_type_checking_imports(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import B\n",
        "pkg/b.py": ("from typing import TYPE_CHECKING\nimport typing\n"
                     "if TYPE_CHECKING:\n    from .a import A\n"
                     "if typing.TYPE_CHECKING:\n    from pkg import a\n"),
    }
    cycles, graph = _cycles(tmp_path, files)
    assert cycles == [] and graph["pkg.b"] == {}
    # ...but the else branch of such an if runs, so it counts
    files["pkg/b.py"] += "if TYPE_CHECKING:\n    pass\nelse:\n    from .a import A\n"
    cycles, _ = _cycles(tmp_path / "2", files)
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"]]


def test_walker_resolves_relative_imports_in_packages(tmp_path):
    _, graph = _cycles(tmp_path, {
        "pkg/__init__.py": "from . import top\n",
        "pkg/top.py": "",
        "pkg/leaf.py": "",
        "pkg/sub/__init__.py": "from . import leaf\nfrom .sibling import s\nfrom .. import top\n",
        "pkg/sub/leaf.py": "from .. import leaf\nfrom . import sibling\nfrom ..sub.sibling import s\n",
        "pkg/sub/sibling.py": "from pkg import sub\n",
    })
    # in sub/__init__.py, "." is pkg.sub itself (not pkg): pkg.sub.leaf, not pkg.leaf
    assert set(graph["pkg.sub"]) == {"pkg.sub.leaf", "pkg.sub.sibling", "pkg.top"}
    # in a plain module "." is its package and ".." the one above
    assert set(graph["pkg.sub.leaf"]) == {"pkg.leaf", "pkg.sub.sibling"}
    assert set(graph["pkg"]) == {"pkg.top"}
    assert graph["pkg.sub.sibling"] == {}  # its own package: initialised first, no edge


def test_walker_counts_the_init_a_submodule_import_runs(tmp_path):
    """``pkg.a`` imports only ``pkg.sub.types``, but that runs ``pkg/sub/__init__.py``, which imports
    ``pkg.sub.algo``, which imports ``pkg.a`` (in a function): a real circle through the package."""
    cycles, graph = _cycles(tmp_path, {
        "pkg/__init__.py": "from .a import run\n",
        "pkg/a.py": "from .sub.types import T\n",
        "pkg/sub/__init__.py": "from .types import T\nfrom .algo import go\n",
        "pkg/sub/types.py": "class T: ...\n",
        "pkg/sub/algo.py": "from .types import T\ndef go():\n    from ..a import run\n",
    })
    assert cycles == [["pkg.a", "pkg.sub", "pkg.sub.algo", "pkg.a"]]
    assert graph["pkg.a"]["pkg.sub"].via_package and not graph["pkg.a"]["pkg.sub.types"].via_package
    assert "(runs pkg/sub/__init__.py)" in describe_cycle(cycles[0], graph)


def test_walker_does_not_count_a_package_its_own_modules_import(tmp_path):
    cycles, graph = _cycles(tmp_path, {
        "pkg/__init__.py": "__version__ = '1'\nfrom .a import f\nfrom .sub import g\n",
        "pkg/a.py": "from . import __version__\nimport pkg\n",
        "pkg/sub/__init__.py": "from .m import g\n",
        "pkg/sub/m.py": "from pkg.sub import helper\nfrom .. import a\n",
    })
    assert cycles == []
    assert set(graph["pkg.a"]) == set() and set(graph["pkg.sub.m"]) == {"pkg.a"}


def test_streamlit_check_sees_every_form(tmp_path):
    root = _make_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    import streamlit as st\n",
        "pkg/b.py": "import typing\nif typing.TYPE_CHECKING:\n    from streamlit.delta import X\n",
        "pkg/c.py": "import importlib\nst = importlib.import_module('streamlit')\n",
        "pkg/d.py": "import streamlit_extras\nfrom .streamlit import x\n",  # not streamlit
    })
    found = _streamlit_imports(root)
    assert [f.split(" ")[0] for f in found] == ["pkg/a.py:2", "pkg/b.py:3", "pkg/c.py:2"]


@pytest.mark.parametrize("source, level, expected", [
    ("pkg.a", 1, "pkg.x"), ("pkg.sub", 1, "pkg.sub.x"), ("pkg.sub.m", 2, "pkg.x"), ("pkg.sub", 2, "pkg.x"),
])
def test_relative_base(source, level, expected):
    node = ast.parse(f"from {'.' * level}x import y").body[0]
    assert _from_base(source, source.endswith("sub"), node) == expected
