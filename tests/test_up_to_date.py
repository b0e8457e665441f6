""""Up to date" means one thing, under DVC and by hand: in a tiny copy of the project whose pipeline has run,
each stage skips when nothing changed, and recomputes when any one input DVC watches for it changes: a
data file it reads, one of its params, or a code file it imports.

The stage runs as `vlkd <stage>` in a new process with the copy's own vlkd first on PYTHONPATH, so an
edited code file in the copy is the code that runs (and the code its record hashes). A stage recomputed
when the record file in its output (`vlkd.record.RECORD`) is a new file with new contents; it skipped when
that file is untouched. The features stage keeps a record per feature file, in the file's metadata, and the
filter one per feature file's kept rows.

The stages whose output DVC keeps across runs (`persist: true`: teacher, features, filter) are also run through
`dvc repro --single-item`, where the stage's own decision is the one that counts; DVC deletes every other
stage's outputs before running it, so for those the run by hand is the case to check. The download is
not here: it fetches only URLs its shards lack whatever changed (a web corpus is a record of what the
servers returned, not a function of the code), and it recomputes its accounting on every run
(tests/test_download.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from test_dvc_pipeline import dvc, dvc_env, make_tiny_project, ran

from vlkd.record import RECORD

# Each stage, where its record lies, and one change of each kind: (params key, new value), a data file it
# reads (edited by `_touch_data`), and a code file it imports.
CHANGES = {
    "synth": {"output": "data/world", "param": ("synth.seed", 5), "data": None,
              "code": "vlkd/world/language.py"},
    "teacher": {"output": "data/teacher", "param": ("teacher.seed", 3), "data": "data/world/captions/annotations.json",
                "code": "vlkd/teacher/retrieval.py"},
    "features": {"output": "data/features", "param": ("features.batch_size", 16), "data": "data/shards/00000.tar",
                 "code": "vlkd/data/feature_writer.py"},
    "filter": {"output": "data/filtered", "param": ("filter.min_caption_words", 4), "data": "data/shards/00000.parquet",
               "code": "vlkd/filter/rules.py"},
    "plm": {"output": "data/plm", "param": ("plm.seed", 3), "data": "data/world/text/heldout.txt",
            "code": "vlkd/plm/metrics.py"},
    "distill": {"output": "data/student", "param": ("distill.seed", 3), "data": "data/plm/config.json",
                "code": "vlkd/distill/rows.py"},
    "evaluate": {"output": "data/eval", "param": ("evaluate.seed", 3), "data": "data/world/images/eval/000000.png",
                 "code": "vlkd/evaluate/caption_metric.py"},
    # The package's params are the paths of what it reads: a changed input is the data case.
    "package": {"output": "data/model", "param": None, "data": "data/eval/metrics.json",
                "code": "vlkd/package/card.py"},
    "vlm": {"output": "data/vlm", "param": ("vlm.seed", 3), "data": "data/shards/00000.tar",
            "code": "vlkd/vlm/pretrain.py"},
    "finetune": {"output": "data/finetune", "param": ("finetune.temperature", 0.05),
                 "data": "data/world/tasks/ve/snli_ve_train.jsonl", "code": "vlkd/finetune/clip_td.py"},
}
PERSISTED = ("teacher", "features", "filter")  # persist: true in dvc.yaml; features' and filter's records are per file


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project with its corpus downloaded; each stage's first run below builds the rest. One VQA
    benchmark in one mode: what evaluate reads, at a third of its time."""
    from vlkd.orchestrate.params import apply_overrides

    root = make_tiny_project(tmp_path_factory.mktemp("records") / "project",
                             evaluate={"vqa_modes": ["direct"], "report_samples": 0})
    benchmarks = yaml.safe_load((root / "params.yaml").read_text())["evaluate"]["benchmarks"]
    apply_overrides(root, {"evaluate.benchmarks": {"vqa": benchmarks["vqa"]}})
    dvc(root, "repro", "download")
    return root


def _env(root: Path) -> dict[str, str]:
    """The copy's vlkd before the installed one (an editable install's finder comes after PYTHONPATH)."""
    return {**dvc_env(), "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}


def _run(root: Path, stage: str) -> None:
    extra = ["--replace-other-teachers"] if stage in ("features", "finetune") else []
    done = subprocess.run([sys.executable, "-m", "vlkd.cli", stage, *extra], cwd=root, env=_env(root),
                          capture_output=True, text=True)
    assert done.returncode == 0, f"vlkd {stage} failed:\n{done.stderr[-3000:]}"


def _records(root: Path, stage: str) -> dict[str, tuple[int, int, bytes]]:
    """Each record of the stage: (inode, mtime, bytes); a feature file's record is the file itself, the
    filter's the kept rows' file of each feature file (its metadata holds the chain of what it read)."""
    output = root / CHANGES[stage]["output"]
    files = {"features": lambda: sorted(output.glob("*.parquet")),
             "filter": lambda: sorted((output / "kept").glob("*.parquet"))}.get(stage, lambda: [output / RECORD])()
    assert files and all(path.is_file() for path in files), f"{stage} wrote no record in {output}"
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns, path.read_bytes()) for path in files}


def _recomputed(before: dict, after: dict, only: set[str] | None = None) -> bool:
    """Every record is a new file (a stage that recomputes writes all of its outputs anew), or, with
    `only`, those records are new and the others untouched (a feature file per shard)."""
    if set(before) != set(after):
        return False
    new = {name for name in after if after[name][0:2] != before[name][0:2]}
    return new == (set(after) if only is None else only)


def _touch_data(path: Path) -> None:
    """A change of content that every reader still accepts: one more tar member (not a sample: no image),
    one more line, or the bytes of another image."""
    if path.suffix == ".parquet":  # the same table, other bytes
        pq.write_table(pq.read_table(path).replace_schema_metadata({b"touched": b"1"}), path)
    elif path.suffix == ".tar":
        with tarfile.open(path, "a") as tar:
            tar.addfile(tarfile.TarInfo(f"zz-extra-{len(tar.getmembers())}.txt"))
    elif path.suffix == ".png":
        shutil.copyfile(path.with_name("000001.png"), path)
    elif path.suffix == ".json":
        path.write_text(path.read_text() + "\n")
    else:
        path.write_text(path.read_text() + path.read_text().splitlines()[0] + "\n")


def _touch_code(root: Path, name: str) -> None:
    path = root / name
    path.write_text(path.read_text() + "\n# a comment is enough: the file the stage imports changed\n")


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(CHANGES))
def test_a_stage_by_hand_skips_when_nothing_changed_and_recomputes_for_any_one_change(project, stage):
    from vlkd.orchestrate.params import apply_overrides

    change = CHANGES[stage]
    _run(project, stage)  # brought up to date with whatever the stages before this one changed
    settled = _records(project, stage)
    _run(project, stage)
    assert _records(project, stage) == settled, f"{stage} recomputed with nothing changed"

    after_param = settled
    if change["param"]:
        key, value = change["param"]
        apply_overrides(project, {key: value})
        _run(project, stage)
        after_param = _records(project, stage)
        assert _recomputed(settled, after_param), f"{stage} did not recompute when {key} changed"

    if change["data"]:
        _touch_data(project / change["data"])
        _run(project, stage)
        after_data = _records(project, stage)
        # a changed shard: its own feature file, and no other, is made again
        only = {Path(change["data"]).stem + ".parquet"} if stage == "features" else None
        assert _recomputed(after_param, after_data, only), f"{stage} did not recompute when {change['data']} changed"
    else:
        after_data = after_param

    _touch_code(project, change["code"])
    _run(project, stage)
    after_code = _records(project, stage)
    assert _recomputed(after_data, after_code), f"{stage} did not recompute when {change['code']} changed"
    _run(project, stage)
    assert _records(project, stage) == after_code, f"{stage} recomputed again with nothing changed"


@pytest.mark.slow
@pytest.mark.parametrize("stage", PERSISTED)
def test_dvc_repro_of_a_kept_output_recomputes_for_a_changed_code_file(project, stage):
    """DVC re-runs the stage for a changed dependency and leaves its output in place; the stage must not
    then call the old output up to date."""
    _repro(project, stage)
    before = _records(project, stage)
    assert _repro(project, stage) == [] and _records(project, stage) == before

    _touch_code(project, CHANGES[stage]["code"])
    assert _repro(project, stage) == [stage]
    assert _recomputed(before, _records(project, stage)), f"dvc re-ran {stage}, which called its old output up to date"


def _repro(project: Path, stage: str) -> list[str]:
    """`dvc repro --single-item stage` with the copy's vlkd; the stages it ran (a failed run fails the test)."""
    done = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=project,
                          env=_env(project), capture_output=True, text=True)
    assert done.returncode == 0, f"dvc repro {stage} failed:\n{done.stderr[-3000:]}"
    return ran(done.stdout + done.stderr)


# The stages whose record lists what they read (`stage_inputs`); features keeps a record per shard's file,
# synth reads nothing, the download is above.
DECLARING = {"teacher": "vlkd.teacher.build", "plm": "vlkd.plm.build", "distill": "vlkd.distill.train",
             "evaluate": "vlkd.evaluate.run", "package": "vlkd.package.build", "vlm": "vlkd.vlm.build",
             "finetune": "vlkd.finetune.run"}


def _paths(inputs: dict) -> list[Path]:
    return [path for value in inputs.values()
            for path in (value.values() if isinstance(value, dict) else [value])]


@pytest.mark.parametrize("stage", list(DECLARING))
def test_every_input_a_stage_records_is_one_dvc_watches(project, stage, monkeypatch):
    """The stage's declared inputs (what its record hashes) lie inside the data dependencies dvc.yaml gives
    it, so DVC re-runs the stage for every change that would make the stage recompute."""
    import importlib

    from vlkd.config import load_params

    monkeypatch.chdir(project)
    params = load_params(project / "params.yaml")
    section = getattr(params, stage)
    deps = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]["deps"]
    watched = [(project / _resolve(dep, params)).resolve() for dep in deps if dep.startswith("${")]
    declared = _paths(importlib.import_module(DECLARING[stage]).stage_inputs(section))
    assert declared, f"{stage} declares no input"
    for path in declared:
        path = (project / path).resolve()
        assert any(path == dep or dep in path.parents for dep in watched), \
            f"{stage} reads {path.relative_to(project)}, which no dependency of dvc.yaml's {stage} stage covers"


def _resolve(dep: str, params) -> str:
    """dvc.yaml's ${section.key}, or ${section.key}/a/file, as params.yaml sets it."""
    name, _, rest = dep.removeprefix("${").partition("}")
    section, key = name.split(".")
    return str(getattr(getattr(params, section), key)) + rest
