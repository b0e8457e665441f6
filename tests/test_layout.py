"""The package layout shows the dataflow: one package per stage, components the stages share, and the
embedded world that no production code depends on. Checked on the imports each module makes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlkd"
STAGES = {"world", "corpus", "teacher", "features", "plm", "distill", "evaluate", "vlm", "finetune"}
COMPONENTS = {"models", "data", "config", "errors", "io", "training"}
GLUE = {"cli", "orchestrate", "__init__"}  # the CLI assembles the stages; orchestrate drives DVC


def part_of(module: str) -> str:
    """The top-level part of vlkd a dotted module name belongs to: vlkd.models.student -> models."""
    return module.split(".")[1]


def imports(path: Path) -> set[str]:
    """Every vlkd module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlkd."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("vlkd.")}
    return found


def modules() -> list[tuple[str, Path]]:
    return [(path.relative_to(PACKAGE).parts[0].removesuffix(".py"), path) for path in sorted(PACKAGE.rglob("*.py"))]


def test_every_module_is_a_stage_a_component_or_glue():
    assert {part for part, _ in modules()} <= STAGES | COMPONENTS | GLUE


@pytest.mark.parametrize(("part", "path"), modules(), ids=lambda value: str(value))
def test_stages_import_components_never_another_stage(part, path):
    imported = {part_of(module) for module in imports(path)}
    if part in COMPONENTS:
        assert not imported & STAGES, f"component {path.name} imports the stage(s) {imported & STAGES}"
    elif part in STAGES:
        assert not imported & (STAGES - {part}), f"{path.name} of stage {part} imports {imported & STAGES - {part}}"


def test_only_the_cli_reaches_the_embedded_world():
    users = {path.relative_to(PACKAGE).as_posix() for part, path in modules()
             if part != "world" and any(part_of(module) == "world" for module in imports(path))}
    assert users == {"cli.py"}
