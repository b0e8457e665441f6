"""A shard that cannot be read to its end (cut short, as a killed copy leaves it, or not a tar at all) is
skipped whole, counted and named with its reason by every stage that reads shards: the features, the
embedded teacher and ViLT's pretraining. The other shards are processed, and nothing raises."""

from __future__ import annotations

import json
import logging
import random
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TEST_MODEL

from vlkd.cli import main
from vlkd.config import TeacherParams, VlmParams
from vlkd.data.feature_writer import Encoding, extract_features
from vlkd.data.webdataset import UnreadableShard, iter_shard, read_pairs
from vlkd.errors import VlkdError
from vlkd.models.teacher import load_teacher
from vlkd.teacher.build import METRICS, build_teacher
from vlkd.vlm.build import build_vlm

PARAMS = Encoding(batch_size=4, num_workers=0, device="cpu", precision="auto", image_tokens=False)
CUT_SAMPLE = 6  # the sample a cut falls in: past a first batch of 4 (PARAMS), which is encoded before the cut


def cut_in_an_image(tar: Path) -> None:
    """Cut the tar in the middle of a sample's image, as a killed copy or download leaves it."""
    image = [member for member in _members(tar) if member.name.endswith(".jpg")][CUT_SAMPLE]
    tar.write_bytes(tar.read_bytes()[: image.offset_data + image.size // 2])


def cut_in_a_header(tar: Path) -> None:
    """Cut the tar inside the header of a sample's first file: tarfile alone ends such a tar quietly."""
    first = next(member for member in _members(tar) if member.name.startswith(_keys(tar)[CUT_SAMPLE]))
    tar.write_bytes(tar.read_bytes()[: first.offset + 100])


def not_a_tar(tar: Path) -> None:
    tar.write_bytes(random.Random(0).randbytes(5000))


def _members(tar: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(tar) as archive:
        return archive.getmembers()


def _keys(tar: Path) -> list[str]:
    return list(dict.fromkeys(member.name.split(".")[0] for member in _members(tar)))


DAMAGES = {
    "cut in an image": (cut_in_an_image, f"cut short after {CUT_SAMPLE} sample(s) (ReadError: unexpected end of data)"),
    "not a tar": (not_a_tar, "no sample could be read (ReadError: invalid header)"),
}


@pytest.fixture
def folder(tiny_world_shards, tmp_path) -> Path:
    """The tiny world's first two shards (tars, parquet and stats files, as the download leaves them)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for part in tiny_world_shards[1].iterdir():
        if part.name.startswith(("00000", "00001")):
            shutil.copy2(part, folder / part.name)
    return folder


@pytest.fixture(scope="module")
def teacher(random_teacher):
    return load_teacher(TEST_MODEL, str(random_teacher))


def assert_warned(caplog, tar: Path, problem: str) -> None:
    """One warning line that says what is wrong, where, and what to do."""
    [line] = [record.getMessage() for record in caplog.records
              if record.levelno == logging.WARNING and str(tar) in record.getMessage()]
    assert line.startswith(f"{tar}: {problem}; skipped") and "re-run `vlkd download`" in line, line


@pytest.mark.parametrize("damage, problem", [
    (cut_in_an_image, DAMAGES["cut in an image"][1]),
    # The sample before the cut is read whole only once the next one starts.
    (cut_in_a_header, f"cut short after {CUT_SAMPLE - 1} sample(s) (ReadError: no end-of-archive block, "
                      "truncated header)"),
    (not_a_tar, DAMAGES["not a tar"][1]),
], ids=["cut in an image", "cut in a header", "not a tar"])
def test_a_shard_that_cannot_be_read_to_its_end_is_unreadable_after_the_samples_before(folder, damage, problem):
    tar = folder / "00001.tar"
    keys = _keys(tar)
    damage(tar)
    read = []
    with pytest.raises(UnreadableShard) as raised:
        read.extend(sample.key for sample in iter_shard(tar))
    assert (raised.value.path, raised.value.problem) == (tar, problem)
    assert read == keys[: raised.value.samples]


@pytest.mark.parametrize("damage", DAMAGES, ids=str)
def test_read_pairs_skips_an_unreadable_shard_whole_and_names_it(folder, damage, caplog):
    breaks, problem = DAMAGES[damage]
    good = _keys(folder / "00000.tar")
    breaks(folder / "00001.tar")
    pairs = read_pairs([folder / "00000.tar", folder / "00001.tar"])
    assert pairs.keys == good and len(pairs.images) == len(pairs.captions) == len(good)  # none of 00001's samples
    assert pairs.unreadable == {"00001.tar": problem} and pairs.bad == []
    assert_warned(caplog, folder / "00001.tar", problem)
    with pytest.raises(VlkdError, match=r"^none of the 1 shard\(s\) can be read, e\.g\. .*00001\.tar: "):
        read_pairs([folder / "00001.tar"])


# One DataLoader worker: the unreadable shard still crosses the process boundary as a batch. With two, a
# worker once exited with code 1 at the loader's shutdown under a load of 6 on 2 cores (make test beside two
# trainings); six reruns, three under load, did not repeat it (left open in issue #36's note).
@pytest.mark.parametrize("damage, workers", [("cut in an image", 1), ("not a tar", 0)], ids=str)
def test_features_skip_an_unreadable_shard_and_embed_it_once_it_is_whole(folder, damage, workers, teacher,
                                                                          tmp_path, caplog):
    breaks, problem = DAMAGES[damage]
    whole = tmp_path / "whole.tar"
    shutil.copy2(folder / "00001.tar", whole)
    breaks(folder / "00001.tar")
    output = tmp_path / "features"
    summary = extract_features(folder, output, teacher, Encoding(**{**PARAMS.__dict__, "num_workers": workers}))
    assert summary["unreadable_shards"] == {"count": 1, "reasons": {"00001.tar": problem}}
    assert summary["images"] == 10 and summary["this_run"]["folder_complete"]
    assert (summary["this_run"]["shards_computed"], summary["this_run"]["shards_unreadable"]) == (1, 1)
    assert json.loads((output / "summary.json").read_text())["unreadable_shards"] == summary["unreadable_shards"]
    assert (output / "00000.parquet").is_file() and not (output / "00001.parquet").exists()  # never done
    assert not list(output.glob(".*.partial"))
    assert_warned(caplog, folder / "00001.tar", problem)

    shutil.copy2(whole, folder / "00001.tar")  # the download repaired
    again = extract_features(folder, output, teacher, PARAMS)
    assert (again["this_run"]["shards_computed"], again["this_run"]["shards_skipped"]) == (1, 1)
    assert again["unreadable_shards"] == {"count": 0, "reasons": {}} and again["images"] == 20
    extract_features(folder, tmp_path / "fresh", teacher, PARAMS)
    assert {path.name for path in output.iterdir()} == {path.name for path in (tmp_path / "fresh").iterdir()}
    assert (output / "summary.json").read_bytes() == (tmp_path / "fresh" / "summary.json").read_bytes()


def test_the_rank_that_finishes_last_names_another_ranks_unreadable_shard(folder, teacher, tmp_path):
    cut_in_an_image(folder / "00001.tar")  # rank 1's shard
    output = tmp_path / "features"
    one = extract_features(folder, output, teacher, PARAMS, rank=1, world_size=2)
    assert not one["this_run"]["folder_complete"] and one["unreadable_shards"]["count"] == 1
    zero = extract_features(folder, output, teacher, PARAMS, rank=0, world_size=2)
    assert zero["this_run"]["folder_complete"]
    extract_features(folder, tmp_path / "single", teacher, PARAMS)
    assert (output / "summary.json").read_bytes() == (tmp_path / "single" / "summary.json").read_bytes()


def test_vlkd_features_writes_its_metrics_past_an_unreadable_shard(folder, random_teacher, tmp_path):
    cut_in_an_image(folder / "00001.tar")
    result = CliRunner().invoke(main, [
        "features", "--num-workers", "0", "--device", "cpu", "--shards", str(folder), "--output",
        str(tmp_path / "features"), "--model", TEST_MODEL, "--pretrained", str(random_teacher),
        "--metrics", str(tmp_path / "metrics.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["unreadable_shards"] == {"count": 1, "reasons": {"00001.tar": DAMAGES["cut in an image"][1]}}


def teacher_params(world: Path, shards: Path, output: Path) -> TeacherParams:
    return TeacherParams(model="vlkd-tiny-resnet", pretrained=None, output=output, shards=shards,
                         eval_images=world / "images" / "eval", eval_captions=world / "captions" / "annotations.json",
                         image_size=64, epochs=1, batch_size=10, lr=1e-3, warmup_steps=3, seed=0, device="cpu")


@pytest.mark.parametrize("damage", DAMAGES, ids=str)
def test_the_embedded_teacher_trains_on_the_readable_shards(tiny_world_shards, folder, damage, tmp_path, caplog):
    breaks, problem = DAMAGES[damage]
    breaks(folder / "00001.tar")
    build_teacher(teacher_params(tiny_world_shards[0], folder, tmp_path / "teacher"))
    training = json.loads((tmp_path / "teacher" / METRICS).read_text())["training"]
    assert training["unreadable_shards"] == {"count": 1, "reasons": {"00001.tar": problem}}
    assert training["train_images"] == 10 and training["bad_samples"]["count"] == 0
    assert_warned(caplog, folder / "00001.tar", problem)


def test_a_teacher_with_no_readable_shard_is_one_clear_error(tiny_world_shards, folder, tmp_path):
    for tar in folder.glob("*.tar"):
        not_a_tar(tar)
    with pytest.raises(VlkdError, match=r"^none of the 2 shard\(s\) can be read, e\.g\. .*00000\.tar: no sample"):
        build_teacher(teacher_params(tiny_world_shards[0], folder, tmp_path / "teacher"))


def test_vilt_pretrains_on_the_readable_shards(folder, tmp_path, caplog):
    cut_in_an_image(folder / "00001.tar")
    manifest = build_vlm(VlmParams(output=tmp_path / "vlm", model=None, shards=folder, vocab_size=200, image_size=32,
                                   patch_size=8, hidden=32, layers=1, heads=2, ffn_dim=64, epochs=1, batch_size=8,
                                   heldout_share=0.2, device="cpu"))
    problem = DAMAGES["cut in an image"][1]
    assert manifest["metrics"]["unreadable_shards"] == {"count": 1, "reasons": {"00001.tar": problem}}
    assert manifest["metrics"]["heldout"]["pairs"] == 2  # a fifth of the readable shard's 10 pairs
    assert_warned(caplog, folder / "00001.tar", problem)
