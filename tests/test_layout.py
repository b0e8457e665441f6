"""The package layout shows the dataflow: one package per stage, components the stages share, and the
embedded world that no production code depends on. Checked on the imports each module makes."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlkd"
STAGES = {"world", "corpus", "teacher", "features", "filter", "plm", "distill", "evaluate", "package", "vlm",
          "finetune"}
COMPONENTS = {"models", "data", "inference", "config", "errors", "io", "record", "training"}
# The CLI assembles the stages (cli_common: what every command shares; cli_tools: predict and the scorers);
# orchestrate drives DVC.
GLUE = {"cli", "cli_common", "cli_tools", "orchestrate", "__init__"}


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


def module_name(path: Path) -> str:
    """The dotted name of a vlkd source file: vlkd/world/synth.py -> vlkd.world.synth, a package's
    __init__.py -> the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The vlkd modules `path` imports, at the top or inside a function; `from vlkd.world import synth`
    imports the module vlkd.world.synth, `from vlkd.world.synth import generate_world` vlkd.world.synth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vlkd":
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                      for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "vlkd"}
    return found & known


def test_no_import_cycle():
    """A circle of imports works only in the order Python happens to load it, and makes its modules one
    piece that cannot be read, tested or changed alone."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: imported_modules(path, set(paths)) - {name} for name, path in paths.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def runtime_imports(path: Path) -> set[str]:
    """`imports(path)` less those under `if TYPE_CHECKING:`, which name types and run nothing."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
                   for statement in block.body for node in ast.walk(statement)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlkd."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("vlkd.")}
    return found


def test_data_never_runs_models():
    """models/ builds on data/ (a language model's batches, a student's features), never the other way: the
    two packages are layers, not one tangle."""
    users = {path.relative_to(PACKAGE).as_posix() for part, path in modules()
             if part == "data" and any(part_of(module) == "models" for module in runtime_imports(path))}
    assert users == set()


@pytest.mark.parametrize(("part", "path"), [(p, path) for p, path in modules() if p in COMPONENTS - {"config"}],
                         ids=lambda value: str(value))
def test_components_take_plain_arguments_not_stage_sections(part, path):
    """A component that takes a stage's params section (PlmParams, FeaturesParams, ...) is tied to that stage's
    configuration; it takes the values it uses, or a small type of its own."""
    sections = [alias.name for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.module == "vlkd.config"
                for alias in node.names if alias.name.endswith("Params") or alias.name.endswith("Spec")]
    assert sections == [], f"{path.relative_to(PACKAGE)} imports the stage section(s) {sections}"
