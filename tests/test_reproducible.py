"""The same inputs give the same artifacts: `dvc repro` of every stage in two fresh copies of the project,
in two folders, gives the same dvc.lock and the same metrics, byte for byte.

Both copies share one port (it is part of the world's URLs, so of the URL list). Each DVC stage runs in
a new Python process with its own hash seed, so an output that depended on set or dict order, on a
wall-clock time, on the folder the project lies in or on img2dataset's thread timing would differ here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_dvc_pipeline import dvc, free_port, make_tiny_project, ran

STAGES = ["synth", "download", "teacher", "features", "filter", "plm", "distill", "evaluate", "package", "vlm",
          "finetune"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    port = free_port()
    roots = []
    for name in ("first", "second"):
        root = make_tiny_project(tmp_path_factory.mktemp(name) / "project", synth={"port": port})
        assert ran(dvc(root, "repro")) == STAGES
        roots.append(root)
    return roots[0], roots[1]


def test_two_fresh_copies_record_the_same_dvc_lock(two_runs):
    first, second = two_runs
    assert (first / "dvc.lock").read_text() == (second / "dvc.lock").read_text()
    lock = yaml.safe_load((first / "dvc.lock").read_text())["stages"]
    assert list(lock) == STAGES


@pytest.mark.parametrize("stage", STAGES[1:])
def test_each_stage_writes_the_same_metrics(two_runs, stage):
    first, second = two_runs
    metrics = (first / "metrics" / f"{stage}.json").read_text()
    assert metrics == (second / "metrics" / f"{stage}.json").read_text()


def test_no_manifest_or_metrics_file_names_the_folder_the_project_lies_in(two_runs):
    for root in two_runs:
        written = [*(root / "data").rglob("*.json"), *(root / "metrics").rglob("*.json"),
                   root / "data" / "eval" / "report.html"]
        assert len(written) > 20
        for path in written:
            assert str(root) not in path.read_text(), path


def test_run_facts_are_kept_beside_the_metrics(two_runs):
    first, _ = two_runs
    for stage in STAGES[1:]:
        run = json.loads((first / "metrics" / "runs" / f"{stage}.json").read_text())
        assert run["seconds"] > 0
        assert "seconds" not in json.dumps(json.loads((first / "metrics" / f"{stage}.json").read_text()))
