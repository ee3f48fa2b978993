"""The import structure of the package: no cycles among fseft modules, and inference does not
pull in the adaptation engine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fseft

SRC = Path(fseft.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The fseft modules `path` imports anywhere (module level, in functions, under
    ``TYPE_CHECKING``): ``import a.b`` -> ``a.b``; ``from a.b import c`` -> ``a.b.c`` when that is
    a module, else ``a.b``. Relative imports are resolved against the module's package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = sorted(SRC.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, modules) for p in files}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_function_level_and_from_imports():
    graph = import_graph()
    assert "fseft.runs.load" in graph["fseft.prediction.segmenter"]
    assert "fseft.methods.registry" in graph["fseft.methods.lora"]
    assert "fseft.inference.feature_cache" in graph["fseft.runs.load"]


def test_no_import_cycles_among_fseft_modules():
    assert find_cycles(import_graph()) == []


def test_inference_does_not_import_the_adaptation_engine():
    code = "import sys, fseft.prediction.segment; print(sorted(m for m in sys.modules if m.startswith('fseft.adaptation.runner')))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


def test_import_fseft_and_the_cli_help_import_no_torch():
    # the command line answers --help in a fraction of a second; every command's own imports
    # (torch, MONAI) happen when it runs
    code = ("import sys, fseft\nassert 'torch' not in sys.modules, 'import fseft'\n"
            "from fseft.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
