"""params.yaml discovery and validation, flag overrides, the CLI's error line, and the install traps."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlkd.cli import main
from vlkd.config import DownloadParams, Params, find_params_file, load_params, with_overrides
from vlkd.errors import VlkdError


def test_params_are_found_from_a_subfolder_and_paths_resolve_against_them(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("download:\n  output: out/shards\n  shard_size: 7\n")
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    assert find_params_file() == tmp_path / "params.yaml"
    params = load_params()
    assert params.download.shard_size == 7
    assert params.download.output == tmp_path / "out" / "shards"
    assert params.synth == Params().synth.model_copy(update={"output": tmp_path / "data" / "world"})


def test_outside_a_project_the_defaults_apply(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the temporary folder is in no project
    assert find_params_file() is None
    assert load_params() == Params()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("download:\n  shard_size: 0\n", "download.shard_size"),
        ("download:\n  distributor: dask\n", "download.distributor"),
        ("downlod:\n  shard_size: 3\n", "downlod"),
        ("download: [1, 2\n", "not valid YAML"),
        ("distill:\n  whole_caption_keep: 3\n", "whole_caption_keep applies to the captions masked whole"),
        ("evaluate:\n  vqa_modes: [direct, direct]\n", "evaluate.vqa_modes"),
        ("evaluate:\n  vqa_mode: direct\n", "evaluate.vqa_mode"),  # the old single mode: named, not ignored
        ("base: configs/embedded.yaml\nteacher:\n  epochs: 2\n", "is an overlay of configs/embedded.yaml"),
    ],
)
def test_bad_params_give_one_clear_line(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(VlkdError, match=message):
        load_params(path)
    result = CliRunner().invoke(main, ["--params", str(path), "download"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_flags_override_params_and_are_validated():
    section = DownloadParams(shard_size=5)
    assert with_overrides(section, shard_size=None, url_col="link").model_dump() == {
        **section.model_dump(), "url_col": "link"}
    with pytest.raises(VlkdError, match="column names must be unique"):
        with_overrides(section, column_names=["url", "url"])


def test_synth_flags_override_params_yaml(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(
        "synth:\n  images: 50\n  eval_images: 3\n  shifted_images: 2\n  text_scenes: 20\n  pretrain_images: 0\n"
        "  image_size: 32\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["synth", "--images", "4", "--seed", "3", "--output", "w"])
    assert result.exit_code == 0, result.output
    world = json.loads((tmp_path / "w" / "world.json").read_text())
    assert world["params"]["images"] == 4 and world["seed"] == 3 and world["params"]["eval_images"] == 3


def test_missing_params_file_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["--params", str(tmp_path / "nope.yaml"), "synth"])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "vlkd"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "download" in result.stdout and "synth" in result.stdout


def test_dataclasses_is_the_standard_library_module():
    # img2dataset pulls in the `dataclasses` backport, which breaks Prefect's server; set-up removes it.
    assert "slots" in inspect.signature(dataclasses.dataclass).parameters
