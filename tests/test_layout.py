"""The layout a newcomer relies on (issue 17): imports go one way, files stay short.

Read statically (ast), so that nothing here depends on which backends can run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "capsnet_fused"
# Kernel sources are long by nature (one @triton.jit body each, tuned together); every other
# Python file of the package, the tests and bench/ stays under this many lines.
MAX_LINES = 650
KERNELS = {
    "capsnet_fused/backends/triton/kernels.py",
    "capsnet_fused/backends/triton/shared_kernels.py",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_imports(path: Path, top_level_only: bool) -> set[str]:
    """The capsnet_fused modules `path` imports (module level only, or anywhere)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:
        # `if TYPE_CHECKING:` blocks and try/except imports at module level count too.
        nodes = [
            n for top in tree.body for n in ast.walk(top) if not isinstance(n, ast.FunctionDef)
        ]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # `from capsnet_fused import ops` imports the module capsnet_fused.ops
            found |= {f"{base}.{alias.name}" for alias in node.names}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def module_graph(top_level_only: bool = True) -> dict[str, set[str]]:
    return {module_name(p): package_imports(p, top_level_only) for p in PACKAGE.rglob("*.py")}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_cycles_between_modules():
    graph = module_graph()
    # A package's __init__ re-exporting its own modules is not a cycle a reader follows.
    cycles = sorted(
        f"{name} -> ... -> {name}"
        for name in graph
        if name
        in reachable(
            {k: {d for d in v if not k.startswith(d + ".")} for k, v in graph.items()}, name
        )
    )
    assert not cycles, cycles


def test_checks_module_is_a_leaf():
    assert module_graph(top_level_only=False)["capsnet_fused._checks"] == set()


def test_the_call_path_goes_one_way():
    """dynamic_routing (ops) -> backends.<name> -> glue/launcher -> kernels: nothing below the
    op imports the op module back, and the reference imports no backend."""
    graph = module_graph(top_level_only=False)
    below = [name for name in graph if name.startswith("capsnet_fused.backends")]
    assert below, "capsnet_fused/backends/ holds the fused backends"
    for name in below:
        assert "capsnet_fused.ops" not in reachable(graph, name), name
    assert not any(
        d.startswith("capsnet_fused.backends") for d in reachable(graph, "capsnet_fused.reference")
    )


@pytest.mark.parametrize("folder", ["capsnet_fused", "tests", "bench"])
def test_files_stay_short(folder):
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / folder).rglob("*.py")
        if str(p.relative_to(ROOT)) not in KERNELS
        and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines: {long}"
