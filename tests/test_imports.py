"""Imports run downward: no circles, and no lower layer reaches up to the pipeline or CLI.

Parsed with ``ast`` (nothing is imported), counting imports inside functions too: a lazy
import still ties the two modules together, it only hides the circle until run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import qcalib

PACKAGE_DIR = Path(qcalib.__file__).parent
LOWER_LAYERS = ("quant", "model", "calibrate", "select", "data", "zoo", "evaluate", "export")
TOP_LAYER = ("qcalib.pipeline", "qcalib.cli", "qcalib.inspect_cli")


def _modules(root: Path = PACKAGE_DIR) -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from pkg import sub`` names ``pkg.sub``)."""
    mods = _modules(root)
    graph = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if sub in mods else module)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_a_planted_circle(tmp_path):
    pkg = tmp_path / "qcalib"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from qcalib.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    graph = import_graph(pkg)
    assert graph["qcalib.a"] == {"qcalib.sub.b"} and graph["qcalib.sub.b"] == {"qcalib.a"}
    assert find_cycle(graph) == ["qcalib.a", "qcalib.sub.b", "qcalib.a"]


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_lower_layers_never_import_the_pipeline_or_the_cli():
    graph = import_graph()
    offenders = [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if module.partition(".")[2].split(".")[0] in LOWER_LAYERS and target in TOP_LAYER
    ]
    assert offenders == []


def test_artifact_does_not_import_the_pipeline():
    assert not import_graph()["qcalib.artifact"] & set(TOP_LAYER)
