"""The README's commands: CI runs them as written, and the test extra covers the suite."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Steps of the README's first command that CI leaves out: the dataset and the training.
NOT_IN_CI = ("apt-get install", "capsnet-fused train")


def _two_commands() -> list[str]:
    """The bash blocks of the README's "Two commands" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_ci_runs_the_readme_commands():
    first, second = _two_commands()
    install = " && ".join(step for step in first.split(" && ") if not step.startswith(NOT_IN_CI))
    assert install.startswith("pip install torch==2.13.0")  # the pin stays
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [
        line.removesuffix(" || exit 1")
        for line in ci_lines
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert commands == [install, second]
    assert 'pip install --no-build-isolation -e ".[test]"' in second


def _third_party_imports(folder: Path) -> set[str]:
    """Top-level modules imported by the .py files of `folder`, less the stdlib and our own."""
    names: set[str] = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif (  # pytest.importorskip("triton")
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "importorskip"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names.add(node.args[0].value.split(".")[0])
    # Our own top-level packages, namespace packages such as bench/ included.
    ours = {path.name for path in ROOT.iterdir() if path.is_dir() and any(path.glob("*.py"))}
    return names - set(sys.stdlib_module_names) - ours - {"__future__"}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower() for req in requirements}


def test_test_extra_holds_everything_the_suite_imports():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = _requirement_names(
        project["dependencies"] + project["optional-dependencies"]["test"]
    )
    assert not any(
        name.startswith("torch")
        for name in _requirement_names(project["optional-dependencies"]["test"])
    ), "the test extra must not pull torch (a CUDA build when unpinned)"
    distributions = importlib.metadata.packages_distributions()
    for module in sorted(_third_party_imports(ROOT / "tests")):
        # The module's distribution names where it is installed, else the module's own name.
        names = {d.lower() for d in distributions.get(module, [module])}
        assert names & installed, f"tests import {module} ({names}), not in the test extra"
