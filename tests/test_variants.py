"""Recipes, overlays and the pipeline's paths, without running a stage: a recipe names every setting and
params.yaml becomes a copy of it, an overlay names its base and replaces named mappings whole, a partial
file without a base is refused, a path dvc.yaml needs that is null or a list is one clear line, a file
outside the folder DVC watches for it is refused, and the synthetic world is planned only when a stage
reads it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from test_dvc_pipeline import PROJECT, make_tiny_project

from vlkd.config import DistillParams, load_params
from vlkd.errors import VlkdError
from vlkd.evaluate.recipe import recipe
from vlkd.orchestrate.params import (
    apply_overrides,
    check_pipeline_paths,
    find_project,
    missing_settings,
    preview,
    use_recipe,
)
from vlkd.orchestrate.stages import plan

VARIANT = PROJECT / "configs" / "cc3m-vitl14-bartlarge.yaml"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_tiny_project(tmp_path_factory.mktemp("variants") / "project")


def variant_in(project: Path, tmp_path: Path, data: dict) -> Path:
    """An overlay of the project's params.yaml as it is."""
    path = project / "configs" / f"{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump({"base": "params.yaml", **data}, sort_keys=False))
    return path


def preview_of(path: Path):
    variant = find_project(path)
    return variant.root, preview(variant.root, variant.overrides, variant.recipe)


@pytest.mark.parametrize("recipe", ["embedded", "cc3m-vitl14-bartlarge"])
def test_a_shipped_recipe_names_every_setting(recipe):
    raw = yaml.safe_load((PROJECT / "configs" / f"{recipe}.yaml").read_text())
    assert missing_settings(raw) == []
    variant = find_project(PROJECT / "configs" / f"{recipe}.yaml")
    assert (variant.recipe, variant.overrides) == (PROJECT / "configs" / f"{recipe}.yaml", {})


def test_params_yaml_is_the_worlds_recipe():
    """The project ships with the embedded world's recipe active (the recorded run's params)."""
    assert (PROJECT / "params.yaml").read_text() == (PROJECT / "configs" / "embedded.yaml").read_text()


def test_a_partial_file_without_a_base_is_one_clear_line(project, tmp_path):
    path = project / "configs" / "partial.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"model": "ViT-B-32", "pretrained": "openai"}}))
    with pytest.raises(VlkdError, match=r"names some settings and no recipe they change .* name its base"):
        find_project(path)


def test_an_overlay_of_the_papers_recipe_inherits_nothing_of_the_world(project, tmp_path):
    shutil.copy(VARIANT, project / "configs" / VARIANT.name)
    path = project / "configs" / "mine.yaml"
    path.write_text(yaml.safe_dump({"base": f"configs/{VARIANT.name}", "teacher": {"model": "ViT-B-32"}}))
    root, params = preview_of(path)
    _, paper = preview_of(project / "configs" / VARIANT.name)
    assert params.teacher.model == "ViT-B-32"
    assert params.model_copy(update={"teacher": paper.teacher}) == paper
    assert params.teacher.shards != load_params(root / "params.yaml").teacher.shards  # not the world's


def test_a_recipe_replaces_params_yaml_whole(project, tmp_path):
    shutil.copy(VARIANT, project / "configs" / VARIANT.name)
    copy = tmp_path / "project"
    shutil.copytree(project, copy)
    assert use_recipe(copy, copy / "configs" / VARIANT.name)
    assert (copy / "params.yaml").read_text() == VARIANT.read_text()  # its comments with it
    assert not use_recipe(copy, copy / "configs" / VARIANT.name)  # already the recipe: untouched


def test_the_shipped_variant_is_the_papers_setting_and_replaces_the_worlds_benchmarks(project):
    shutil.copy(VARIANT, project / "configs" / VARIANT.name)
    root, params = preview_of(project / "configs" / VARIANT.name)
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
    for file in ("embedded", name):
        shutil.copy(PROJECT / "configs" / f"{file}.yaml", project / "configs" / f"{file}.yaml")
    variant = find_project(project / "configs" / f"{name}.yaml")
    named = yaml.safe_load((PROJECT / "configs" / f"{name}.yaml").read_text())
    assert named.pop("base") == "configs/embedded.yaml" and variant.recipe == project / "configs/embedded.yaml"
    overrides = variant.overrides
    assert set(overrides) == {f"{section}.{key}" for section, values in named.items() for key in values}
    assert all(key.endswith(".epochs") for key in overrides)
    params = preview(variant.root, overrides, variant.recipe)
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
    root, params = preview_of(variant_in(project, tmp_path, {"teacher": {"epochs": 2}}))
    assert params.teacher.epochs == 2
    assert params.teacher.model == load_params(root / "params.yaml").teacher.model  # the rest is the project's
    assert set(params.evaluate.benchmarks) == {"vqa", "vqa-shifted", "captions"}


def test_a_null_path_that_dvc_yaml_depends_on_is_one_clear_line(project, tmp_path):
    path = variant_in(project, tmp_path, {"plm": {"text": None}})
    with pytest.raises(VlkdError, match=r"plm.text: Input is not a valid path"):
        preview_of(path)
    root = project
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["distill"]["plm"] = None  # what DVC would meet in a dvc.yaml edited by hand: a bare AssertionError
    with pytest.raises(VlkdError, match=r"the distill stage of .*dvc.yaml depends on distill.plm, which is not set"):
        check_pipeline_paths(root, raw)


def test_a_list_of_shards_in_the_pipeline_is_one_clear_line(project, tmp_path):
    path = variant_in(project, tmp_path, {"features": {"shards": ["a.tar", "b.tar"]}})
    with pytest.raises(VlkdError, match="depends on features.shards, .*DVC cannot depend on a list"):
        preview_of(path)


def test_a_file_outside_the_folder_dvc_watches_is_refused(project, tmp_path):
    path = variant_in(project, tmp_path, {"plm": {"text": "data/text"}})
    with pytest.raises(VlkdError, match=r"plm.corpus \(.*data/world/text/train.txt\) is outside plm.text"):
        preview_of(path)
    benchmark = {"task": "caption", "images": "data/world/images/eval",
                 "annotations": "data/world/captions/annotations.json"}
    path = variant_in(project, tmp_path, {"evaluate": {"data": "data/benchmarks", "benchmarks": {"c": benchmark}}})
    with pytest.raises(VlkdError, match=r"evaluate.benchmarks.c.images .* is outside evaluate.data"):
        preview_of(path)


def test_the_world_is_planned_only_when_a_stage_reads_it(tmp_path):
    root = make_tiny_project(tmp_path / "project")
    assert [stage.name for stage in plan(root)][0] == "synth"
    apply_overrides(root, {"download.url_list": "data/corpus/urls.tsv", "package.url_list": "data/corpus/urls.tsv",
                           "teacher.shards": "data/shards",
                           "teacher.eval_images": "data/coco/val2014",
                           "teacher.eval_captions": "data/coco/captions.json", "plm.text": "data/text",
                           "plm.corpus": None, "plm.heldout": None, "evaluate.data": "data/benchmarks",
                           "evaluate.benchmarks": {}, "finetune.data": "data/benchmarks", "finetune.tasks": {}})
    assert [stage.name for stage in plan(root)] == ["download", "teacher", "features", "filter", "plm", "distill",
                                                    "evaluate", "package", "vlm", "finetune"]
    assert [stage.name for stage in plan(root, "synth")] == ["synth"]


def test_the_worlds_recipe_is_the_papers_and_the_extended_overlay_turns_on_exactly_the_extensions(project):
    """configs/embedded.yaml distils with the paper's recipe: every extension at the code's default (off).
    configs/embedded-extended.yaml turns on the four extensions, with the rate and decoding they were recorded with,
    and changes nothing else."""
    for file in ("embedded", "embedded-extended"):
        shutil.copy(PROJECT / "configs" / f"{file}.yaml", project / "configs" / f"{file}.yaml")
    variant = find_project(project / "configs" / "embedded-extended.yaml")
    extended = preview(variant.root, variant.overrides, variant.recipe)
    world = preview(variant.root, {}, variant.recipe)
    code = DistillParams()
    extensions = {"prefix", "retention_weight", "reading_weight", "whole_caption_share", "whole_caption_keep"}
    assert all(getattr(world.distill, key) == getattr(code, key) for key in extensions)
    changed = {key for key in DistillParams.model_fields
               if getattr(extended.distill, key) != getattr(world.distill, key)}
    assert changed == extensions | {"prefix_tokens", "language_model_lr"}
    assert extended.evaluate.decoding == "free" and world.evaluate.decoding == "forced"
    assert extended.model_dump(exclude={"distill", "evaluate"}) == world.model_dump(exclude={"distill", "evaluate"})
    assert extended.evaluate.model_dump(exclude={"decoding"}) == world.evaluate.model_dump(exclude={"decoding"})
    # each scorecard names the recipe: the paper's, or with each extension (vlkd/evaluate/recipe.py)
    assert recipe(world.distill.model_dump())["name"] == "VLKD (the paper's recipe)"
    assert recipe(extended.distill.model_dump())["name"] == \
        "VLKD + pseudo-QA + retention + patch prefix + whole-caption masking"
    assert recipe({**world.distill.model_dump(), "ttdm_weight": 0, "itcl_weight": 0.0})["name"] == \
        "VLKD without TTDM and ITCL"
