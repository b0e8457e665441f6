"""dvc.yaml knows what each stage runs: its code dependencies cover every vlkd module the stage's command
imports (directly or through other modules), and params.yaml names every setting, so a code or settings
change re-runs exactly the stages it can affect and nothing ever needs `dvc commit -f`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlkd.config import Params
from vlkd.record import code_files, imported_files

PROJECT = Path(__file__).resolve().parents[1]
# The modules each `vlkd <stage>` command runs (vlkd/cli.py imports them inside the command; download
# serves the embedded world's folder while it fetches a world's list). The stages' records hash the same
# files (vlkd.record.code_files): all but the typed params, whose values DVC sees through params.yaml
# (checked below), and the error type.
ENTRY = {"synth": ["vlkd/world/synth.py"], "download": ["vlkd/corpus/download.py", "vlkd/world/server.py"],
         "teacher": ["vlkd/teacher/build.py"], "features": ["vlkd/features/extract.py"],
         "filter": ["vlkd/filter/run.py"], "plm": ["vlkd/plm/build.py"], "distill": ["vlkd/distill/train.py"],
         "evaluate": ["vlkd/evaluate/run.py"], "package": ["vlkd/package/build.py"],
         "vlm": ["vlkd/vlm/build.py"], "finetune": ["vlkd/finetune/run.py"]}


def stages() -> dict:
    return yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]


def test_every_stage_has_an_entry_module():
    assert set(stages()) == set(ENTRY)


@pytest.mark.parametrize("stage", sorted(ENTRY))
def test_code_dependencies_cover_every_module_the_stage_imports(stage):
    deps = [dep for dep in stages()[stage]["deps"] if dep.startswith("vlkd")]
    covered = [file for file in code_files(ENTRY[stage])
               if any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)]
    missing = sorted(code_files(ENTRY[stage]) - set(covered))
    assert not missing, f"dvc.yaml's {stage} stage does not depend on {missing}, which it runs"


@pytest.mark.parametrize("stage", sorted(ENTRY))
def test_code_dependencies_name_only_code_the_stage_runs(stage):
    """A dependency the stage does not import would re-run it for a change that cannot affect it."""
    runs = imported_files(ENTRY[stage])
    deps = [dep for dep in stages()[stage]["deps"] if dep.startswith("vlkd")]
    for dep in deps:
        files = {path.relative_to(PROJECT).as_posix() for path in (PROJECT / dep).rglob("*.py") if path.stat().st_size}
        files = files or {dep}
        assert files <= runs, f"dvc.yaml's {stage} stage depends on {sorted(files - runs)}, which it never imports"


@pytest.mark.parametrize("section", [name for name in Params.model_fields if name != "pipeline"])
def test_params_yaml_names_every_setting_of_each_stage(section):
    """A value left to vlkd/config/'s default would change a stage's result unseen by DVC."""
    written = yaml.safe_load((PROJECT / "params.yaml").read_text())[section]
    expected = set(Params.model_fields[section].annotation.model_fields)
    assert expected - set(written) == set(), f"params.yaml's {section} leaves these to the code's defaults"
