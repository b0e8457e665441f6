"""Variant params files and the pipeline's paths, without running a stage: a variant replaces named
mappings whole, a path dvc.yaml needs that is null or a list is one clear line, a file outside the folder
DVC watches for it is refused, and the synthetic world is planned only when a stage reads it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from test_dvc_pipeline import PROJECT, make_tiny_project

from vlkd.config import load_params
from vlkd.errors import VlkdError
from vlkd.orchestrate.params import apply_overrides, check_pipeline_paths, find_project, preview
from vlkd.orchestrate.stages import plan

VARIANT = PROJECT / "configs" / "cc3m-vitl14-bartlarge.yaml"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_tiny_project(tmp_path_factory.mktemp("variants") / "project")


def variant_in(project: Path, tmp_path: Path, data: dict) -> Path:
    path = project / "configs" / f"{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_shipped_variant_is_the_papers_setting_and_replaces_the_worlds_benchmarks(project):
    shutil.copy(VARIANT, project / "configs" / VARIANT.name)
    root, overrides = find_project(project / "configs" / VARIANT.name)
    params = preview(root, overrides)
    assert set(params.evaluate.benchmarks) == {"vqav2", "okvqa", "coco-captions"}
    assert (params.teacher.model, params.teacher.pretrained, params.plm.model) == ("ViT-L-14", "openai",
                                                                                     "facebook/bart-large")
    assert params.evaluate.vqa_modes == ["direct", "describe"]  # the paper's inference is the headline
    distill = params.distill
    assert (distill.prefix, distill.retention_weight, distill.reading_weight) == ("pooled", 0.0, 0.0)
    assert params.evaluate.caption_prompt == "A picture of <mask>"
    assert params.evaluate.benchmarks["vqav2"].image_pattern.format(image_id=42) == "COCO_val2014_000000000042.jpg"


@pytest.mark.parametrize("name", ["embedded-full", "embedded-quick"])
def test_the_worlds_shipped_lengths_change_only_the_epochs_they_name(project, name):
    shutil.copy(PROJECT / "configs" / f"{name}.yaml", project / "configs" / f"{name}.yaml")
    root, overrides = find_project(project / "configs" / f"{name}.yaml")
    named = yaml.safe_load((PROJECT / "configs" / f"{name}.yaml").read_text())
    assert set(overrides) == {f"{section}.{key}" for section, values in named.items() for key in values}
    assert all(key.endswith(".epochs") for key in overrides)
    params = preview(root, overrides)
    assert all(getattr(params, key.split(".")[0]).epochs == value for key, value in overrides.items())


def test_an_override_edits_one_line_of_the_projects_own_params_file(tmp_path):
    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text().splitlines()
    apply_overrides(tmp_path, {"teacher.epochs": 4})
    after = (tmp_path / "params.yaml").read_text().splitlines()
    edited = [(old, new) for old, new in zip(before, after, strict=True) if old != new]  # no line joined or split
    assert [(old.split("#")[0].strip(), new.split("#")[0].strip()) for old, new in edited] == [("epochs: 6",
                                                                                               "epochs: 4")]


def test_a_variant_merges_sections_key_by_key(project, tmp_path):
    root, overrides = find_project(variant_in(project, tmp_path, {"teacher": {"epochs": 2}}))
    params = preview(root, overrides)
    assert params.teacher.epochs == 2
    assert params.teacher.model == load_params(root / "params.yaml").teacher.model  # the rest is the project's
    assert set(params.evaluate.benchmarks) == {"vqa", "vqa-shifted", "captions"}


def test_a_null_path_that_dvc_yaml_depends_on_is_one_clear_line(project, tmp_path):
    root, overrides = find_project(variant_in(project, tmp_path, {"plm": {"text": None}}))
    with pytest.raises(VlkdError, match=r"plm.text: Input is not a valid path"):
        preview(root, overrides)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["distill"]["plm"] = None  # what DVC would meet in a dvc.yaml edited by hand: a bare AssertionError
    with pytest.raises(VlkdError, match=r"the distill stage of .*dvc.yaml depends on distill.plm, which is not set"):
        check_pipeline_paths(root, raw)


def test_a_list_of_shards_in_the_pipeline_is_one_clear_line(project, tmp_path):
    root, overrides = find_project(variant_in(project, tmp_path, {"features": {"shards": ["a.tar", "b.tar"]}}))
    with pytest.raises(VlkdError, match="depends on features.shards, .*DVC cannot depend on a list"):
        preview(root, overrides)


def test_a_file_outside_the_folder_dvc_watches_is_refused(project, tmp_path):
    root, overrides = find_project(variant_in(project, tmp_path, {"plm": {"text": "data/text"}}))
    with pytest.raises(VlkdError, match=r"plm.corpus \(.*data/world/text/train.txt\) is outside plm.text"):
        preview(root, overrides)
    benchmark = {"task": "caption", "images": "data/world/images/eval",
                 "annotations": "data/world/captions/annotations.json"}
    root, overrides = find_project(variant_in(project, tmp_path, {"evaluate": {"data": "data/benchmarks",
                                                                               "benchmarks": {"c": benchmark}}}))
    with pytest.raises(VlkdError, match=r"evaluate.benchmarks.c.images .* is outside evaluate.data"):
        preview(root, overrides)


def test_the_world_is_planned_only_when_a_stage_reads_it(tmp_path):
    root = make_tiny_project(tmp_path / "project")
    assert [stage.name for stage in plan(root)][0] == "synth"
    apply_overrides(root, {"download.url_list": "data/corpus/urls.tsv", "teacher.shards": "data/shards",
                           "teacher.eval_images": "data/coco/val2014",
                           "teacher.eval_captions": "data/coco/captions.json", "plm.text": "data/text",
                           "plm.corpus": None, "plm.heldout": None, "evaluate.data": "data/benchmarks",
                           "evaluate.benchmarks": {}, "finetune.data": "data/benchmarks", "finetune.tasks": {}})
    assert [stage.name for stage in plan(root)] == ["download", "teacher", "features", "plm", "distill", "evaluate",
                                                    "vlm", "finetune"]
    assert [stage.name for stage in plan(root, "synth")] == ["synth"]
