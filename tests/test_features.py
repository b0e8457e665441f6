"""The features stage with real (tiny, randomly initialised) open_clip models on real shards."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import webdataset as wds
from click.testing import CliRunner
from conftest import TEST_MODEL, make_random_teacher
from PIL import Image

from vlkd.cli import main
from vlkd.data import feature_writer
from vlkd.data.feature_schema import read_metadata
from vlkd.data.feature_store import FeatureStore, fixed_size_to_numpy
from vlkd.data.feature_writer import Encoding, extract_features
from vlkd.data.webdataset import iter_shard, list_shards
from vlkd.errors import VlkdError
from vlkd.models.teacher import load_teacher

PARAMS = Encoding(batch_size=4, num_workers=0, device="cpu", precision="auto", image_tokens=False)


@pytest.fixture
def shards(tiny_world_shards, tmp_path):
    """A private copy of the tiny shards, so a test may damage them."""
    return shutil.copytree(tiny_world_shards[1], tmp_path / "shards")


@pytest.fixture(scope="module")
def teacher(random_teacher):
    return load_teacher(TEST_MODEL, str(random_teacher))


def test_decoding_workers_do_not_inherit_this_process_exit_hooks(shards, tmp_path, teacher):
    """A worker forked from this process would run the hooks its threads registered to run at exit (a
    thread pool's, a Prefect run's); one that raises ends the worker with code 1 and no traceback, and the
    DataLoader fails a finished run, as CI saw. threading's private registry is the one such hooks use."""
    def failing_hook():
        raise RuntimeError("an exit hook of the parent process")

    threading._register_atexit(failing_hook)
    try:
        summary = extract_features(shards, tmp_path / "features", teacher, replace(PARAMS, num_workers=2))
    finally:
        threading._threading_atexits[:] = [hook for hook in threading._threading_atexits  # partials
                                           if hook.func is not failing_hook]
    assert summary["images"] == sum(1 for tar in list_shards(shards) for _ in iter_shard(tar))


def test_rows_equal_encode_image_and_encode_text(shards, tmp_path, teacher):
    extract_features(shards, tmp_path / "features", teacher, replace(PARAMS, num_workers=2))
    for tar in list_shards(shards):
        table = pq.read_table(tmp_path / "features" / f"{tar.stem}.parquet")
        samples = list(iter_shard(tar))
        assert table.column("key").to_pylist() == [s.key for s in samples]
        assert table.column("captions").to_pylist() == [list(s.captions) for s in samples]
        images = torch.stack([teacher.preprocess(Image.open(io.BytesIO(s.image))) for s in samples])
        with torch.no_grad():
            expected_image = F.normalize(teacher.model.encode_image(images), dim=-1).numpy()
            expected_text = F.normalize(teacher.model.encode_text(teacher.tokenizer([s.caption for s in samples])),
                                        dim=-1).numpy()
        stored_image = fixed_size_to_numpy(table.column("image_embedding")).astype(np.float32)
        stored_text = fixed_size_to_numpy(table.column("text_embedding")).astype(np.float32)
        np.testing.assert_allclose(stored_image, expected_image, atol=1e-3, rtol=1e-3)  # float16 rounding
        np.testing.assert_allclose(stored_text, expected_text, atol=1e-3, rtol=1e-3)
        assert np.allclose(np.linalg.norm(stored_image, axis=1), 1, atol=1e-2)


def test_schema_and_metadata(shards, tmp_path, teacher):
    extract_features(shards, tmp_path / "features", teacher, PARAMS)
    path = tmp_path / "features" / "00000.parquet"
    schema = pq.read_schema(path)
    assert schema.field("image_embedding").type == pa.list_(pa.float16(), 32)
    assert schema.field("text_embedding").type == pa.list_(pa.float16(), 32)
    assert "image_tokens" not in schema.names
    metadata = read_metadata(path)
    assert metadata["teacher"] == teacher.fingerprint.as_dict()
    assert metadata["embed_dim"] == 32 and metadata["dtype"] == "float16" and metadata["shard"] == "00000.tar"
    assert "Normalize" in metadata["preprocess"] and metadata["image_size"] == 32


def test_patch_tokens_are_the_final_layer_tokens(shards, tmp_path, random_teacher):
    with_tokens = load_teacher(TEST_MODEL, str(random_teacher), image_tokens=True)
    extract_features(shards, tmp_path / "features", with_tokens, replace(PARAMS, image_tokens=True))
    table = pq.read_table(tmp_path / "features" / "00001.parquet")
    assert table.schema.field("image_tokens").type == pa.list_(pa.list_(pa.float16(), 64), 16)  # 4x4 patches
    sample = next(iter_shard(shards / "00001.tar"))
    with torch.no_grad():
        _, tokens = with_tokens.model.encode_image(with_tokens.preprocess(Image.open(io.BytesIO(sample.image)))[None])
    stored = fixed_size_to_numpy(table.column("image_tokens"))[0].astype(np.float32)
    np.testing.assert_allclose(stored, tokens[0].numpy(), atol=2e-2, rtol=1e-2)


RESNET = "vlkd-test-resnet"
RESNET_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def test_a_resnet_teacher_stores_the_pooled_token_and_one_token_per_feature_map_cell(shards, tmp_path):
    checkpoint = make_random_teacher(tmp_path / "resnet", model_name=RESNET, config=RESNET_CONFIG)
    plain = load_teacher(RESNET, str(checkpoint))
    with_tokens = load_teacher(RESNET, str(checkpoint), image_tokens=True)
    extract_features(shards, tmp_path / "features", with_tokens, replace(PARAMS, image_tokens=True))
    table = pq.read_table(tmp_path / "features" / "00000.parquet")
    # [pooled ; 2x2 cells]: a 64-pixel image leaves a 2x2 feature map after the ResNet's 32x downsampling.
    assert table.schema.field("image_tokens").type == pa.list_(pa.list_(pa.float16(), 16), 5)
    sample = next(iter_shard(shards / "00000.tar"))
    image = with_tokens.preprocess(Image.open(io.BytesIO(sample.image)))[None]
    with torch.no_grad():
        pooled, tokens = with_tokens.model.encode_image(image)
        torch.testing.assert_close(pooled, plain.model.encode_image(image))  # the pooled output is unchanged
        assert torch.equal(tokens[:, 0], pooled) and not torch.allclose(tokens[:, 1], tokens[:, 2])
    stored = fixed_size_to_numpy(table.column("image_tokens"))[0].astype(np.float32)
    np.testing.assert_allclose(stored, tokens[0].numpy(), atol=2e-2, rtol=1e-2)
    embedding = fixed_size_to_numpy(table.column("image_embedding"))[0].astype(np.float32)
    np.testing.assert_allclose(embedding, F.normalize(pooled, dim=-1)[0].numpy(), atol=1e-3, rtol=1e-3)


def test_done_shards_are_skipped_and_new_ones_computed(shards, tmp_path, teacher):
    output = tmp_path / "features"
    first = extract_features(shards, output, teacher, PARAMS)
    assert first["shards"] == {"total": 3, "this_rank": 3}
    assert first["this_run"]["shards_computed"] == 3 and first["this_run"]["shards_skipped"] == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in output.glob("*.parquet")}
    again = extract_features(shards, output, teacher, PARAMS)
    assert again["this_run"]["shards_computed"] == 0 and again["this_run"]["images_encoded"] == 0
    assert again["images"] == first["images"] == first["this_run"]["images_encoded"]  # what the folder holds
    assert {p.name: p.stat().st_mtime_ns for p in output.glob("*.parquet")} == mtimes
    # A refresh adds a shard: only that one is computed, and the folder's summary is a full run's.
    grown = tmp_path / "grown"
    shutil.copytree(shards, grown)
    for suffix in (".tar", ".parquet", "_stats.json"):
        shutil.copy(grown / f"00002{suffix}", grown / f"00003{suffix}")
    refresh = extract_features(grown, output, teacher, PARAMS)
    assert refresh["this_run"]["shards_computed"] == 1 and (output / "00003.parquet").exists()
    extract_features(grown, tmp_path / "full", teacher, PARAMS)
    assert (output / "summary.json").read_bytes() == (tmp_path / "full" / "summary.json").read_bytes()


def test_a_killed_run_resumes_to_the_same_result(shards, tmp_path, teacher, monkeypatch):
    clean = tmp_path / "clean"
    extract_features(shards, clean, teacher, PARAMS)

    killed = tmp_path / "killed"
    real_commit = feature_writer.ShardWriter.commit
    commits = []

    def commit_then_die(self, bad):
        if commits:  # the second shard's file is still partial when the process "dies"
            raise KeyboardInterrupt
        real_commit(self, bad)
        commits.append(self.path)

    monkeypatch.setattr(feature_writer.ShardWriter, "commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        extract_features(shards, killed, teacher, PARAMS)
    monkeypatch.setattr(feature_writer.ShardWriter, "commit", real_commit)
    assert len(list(killed.glob("[0-9]*.parquet"))) == 1 and list(killed.glob(".*.partial"))

    resumed = extract_features(shards, killed, teacher, PARAMS)
    assert resumed["this_run"]["shards_skipped"] == 1 and resumed["this_run"]["shards_computed"] == 2
    assert (killed / "summary.json").read_bytes() == (clean / "summary.json").read_bytes()
    assert not list(killed.glob(".*.partial"))
    for path in sorted(clean.glob("[0-9]*.parquet")):
        assert pq.read_table(killed / path.name).equals(pq.read_table(path))


def test_a_corrupt_image_is_counted_and_skipped(shards, tmp_path, teacher):
    tar_path = shards / "00001.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    broken_key = next(m.name.split(".")[0] for m, _ in members if m.name.endswith(".jpg"))
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members:
            if member.name == f"{broken_key}.jpg":
                data = b"\xff\xd8 this is no jpeg"
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))

    summary = extract_features(shards, tmp_path / "features", teacher, PARAMS)
    assert summary["bad_samples"]["count"] == 1 and summary["bad_samples"]["keys"] == [broken_key]
    keys = pq.read_table(tmp_path / "features" / "00001.parquet").column("key").to_pylist()
    assert broken_key not in keys and len(keys) == 9
    assert json.loads((tmp_path / "features" / "summary.json").read_text())["bad_samples"]["keys"] == [broken_key]


def test_ranks_split_the_shards_and_the_last_to_finish_writes_the_folders_summary(shards, tmp_path, teacher):
    output = tmp_path / "features"
    zero = extract_features(shards, output, teacher, PARAMS, rank=0, world_size=2)
    assert zero["shards"] == {"total": 3, "this_rank": 2} and not zero["this_run"]["folder_complete"]
    assert sorted(p.name for p in output.iterdir()) == ["00000.parquet", "00002.parquet"]  # no summary yet
    one = extract_features(shards, output, teacher, PARAMS, rank=1, world_size=2)
    assert one["this_run"]["folder_complete"] and one["this_run"]["shards_computed"] == 1
    extract_features(shards, tmp_path / "single", teacher, PARAMS)
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    assert (output / "summary.json").read_bytes() == (tmp_path / "single" / "summary.json").read_bytes()


def test_replacing_another_teachers_files_each_rank_replaces_only_its_own(shards, tmp_path, teacher):
    other = load_teacher(TEST_MODEL, str(make_random_teacher(tmp_path / "other", seed=1)))
    output = tmp_path / "features"
    extract_features(shards, output, other, PARAMS)
    ours = teacher.fingerprint.as_dict()
    # Rank 1 starts first: it must neither stop at nor delete rank 0's old files, which rank 0 replaces.
    extract_features(shards, output, teacher, PARAMS, rank=1, world_size=2, replace_other_teachers=True)
    assert {p.name: read_metadata(p)["teacher"] == ours for p in sorted(output.glob("*.parquet"))} == {
        "00000.parquet": False, "00001.parquet": True, "00002.parquet": False}
    extract_features(shards, output, teacher, PARAMS, rank=0, world_size=2, replace_other_teachers=True)
    assert all(read_metadata(p)["teacher"] == ours for p in output.glob("*.parquet"))
    assert json.loads((output / "summary.json").read_text())["teacher"] == ours


def test_reader_batches_across_files_and_refuses_other_teachers(shards, tmp_path, teacher, random_teacher):
    output = tmp_path / "features"
    extract_features(shards, output, teacher, PARAMS)
    store = FeatureStore(output, expected_teacher=teacher.fingerprint.as_dict())
    assert store.num_rows == 30 and store.embed_dim == 32
    batches = list(store.iter_batches(batch_size=7))
    assert [len(b["key"]) for b in batches] == [7, 7, 7, 7, 2]
    assert batches[0]["image_embedding"].shape == (7, 32) and batches[0]["image_embedding"].dtype == torch.float32
    keys = [k for b in batches for k in b["key"]]
    assert keys == [k for p in sorted(output.glob("[0-9]*.parquet")) for k in pq.read_table(p)["key"].to_pylist()]
    with pytest.raises(VlkdError, match="no column"):
        next(store.iter_batches(4, columns=["image_tokens"]))
    other = {**teacher.fingerprint.as_dict(), "weights_sha256": "0" * 64}
    with pytest.raises(VlkdError, match="not the expected"):
        FeatureStore(output, expected_teacher=other)


def invoke(*args):
    return CliRunner().invoke(main, ["features", "--num-workers", "0", "--device", "cpu", *args])


def assert_one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_bad_inputs_give_one_clear_line(shards, tmp_path, random_teacher):
    good = ["--model", TEST_MODEL, "--pretrained", str(random_teacher)]
    assert_one_line_error(invoke("--shards", str(tmp_path / "nope"), "--output", str(tmp_path / "f"), *good),
                          "does not exist")
    assert_one_line_error(invoke("--shards", str(shards), "--output", str(tmp_path / "f"),
                                 "--model", "no-such-model", "--pretrained", str(random_teacher)),
                          "unknown open_clip model 'no-such-model'")
    assert_one_line_error(invoke("--shards", str(shards), "--output", str(tmp_path / "f"),
                                 "--model", "RN50", "--pretrained", str(random_teacher)), "does not match model")
    assert_one_line_error(invoke("--shards", str(shards), "--output", str(tmp_path / "f"),
                                 "--model", TEST_MODEL, "--pretrained", str(tmp_path / "missing.safetensors")),
                          "does not exist")

    made = invoke("--shards", str(shards), "--output", str(tmp_path / "f"), *good)
    assert made.exit_code == 0, made.output
    other = make_random_teacher(tmp_path / "other-teacher", seed=1)
    assert_one_line_error(invoke("--shards", str(shards), "--output", str(tmp_path / "f"),
                                 "--model", TEST_MODEL, "--pretrained", str(other)), "made by another teacher")
    replaced = invoke("--shards", str(shards), "--output", str(tmp_path / "f"), "--model", TEST_MODEL,
                      "--pretrained", str(other), "--replace-other-teachers")
    assert replaced.exit_code == 0, replaced.output
    assert {read_metadata(p)["teacher"]["weights_sha256"] for p in (tmp_path / "f").glob("*.parquet")} == {
        load_teacher(TEST_MODEL, str(other)).fingerprint.weights_sha256}


def test_every_caption_of_a_sample_is_stored(shards, tmp_path, teacher):
    extract_features(shards, tmp_path / "features", teacher, PARAMS)
    rows = [row for path in sorted((tmp_path / "features").glob("*.parquet"))
            for row in pq.read_table(path, columns=["caption", "captions"]).to_pylist()]
    assert all(row["captions"][0] == row["caption"] for row in rows)
    assert all(len(row["captions"]) == 3 for row in rows)  # the tiny world's captions_per_image


# -- any webdataset shards: a folder, a brace pattern, a list; under torchrun ----------------------------------
def jpeg_bytes(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), ((index * 53) % 256, (index * 17) % 256, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_foreign_shards(folder: Path, shards: int = 3, per_shard: int = 4, broken: dict | None = None,
                         pattern: str = "cc-%06d.tar") -> list[list[str]]:
    """Shards as webdataset's own ShardWriter writes them (no stats, no parquet); the keys of each shard.
    `broken`: {sample index: its files instead of a good jpg and txt}."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = [[f"{1000 + shard * per_shard + i:09d}" for i in range(per_shard)] for shard in range(shards)]
    with wds.ShardWriter(str(folder / pattern), maxcount=per_shard, verbose=0) as sink:
        for index, key in enumerate(key for shard in keys for key in shard):
            files = (broken or {}).get(index, {"jpg": jpeg_bytes(index), "txt": f"picture number {index}"})
            sink.write({"__key__": key, **files})
    return keys


def feature_keys(folder: Path, names: list[str]) -> list[list[str]]:
    return [pq.read_table(folder / f"{name}.parquet", columns=["key"]).column("key").to_pylist() for name in names]


CC = ["cc-000000", "cc-000001", "cc-000002"]


def test_foreign_shards_from_a_folder_a_pattern_and_a_list(tmp_path, teacher):
    keys = write_foreign_shards(tmp_path / "cc")
    assert sorted(p.name for p in (tmp_path / "cc").iterdir()) == [f"{name}.tar" for name in CC]
    specs = {"folder": tmp_path / "cc", "pattern": str(tmp_path / "cc" / "cc-{000000..000002}.tar"),
             "list": [tmp_path / "cc" / f"{name}.tar" for name in CC]}
    for name, spec in specs.items():
        summary = extract_features(spec, tmp_path / name, teacher, PARAMS)
        assert summary["shards"]["total"] == 3 and summary["images"] == 12, name
        assert feature_keys(tmp_path / name, CC) == keys, name
        assert FeatureStore(tmp_path / name).num_rows == 12  # the reader finds files of any name
    assert read_metadata(tmp_path / "folder" / "cc-000001.parquet")["shard"] == "cc-000001.tar"
    for name in (*CC, "summary"):
        suffix = ".json" if name == "summary" else ".parquet"
        contents = {(tmp_path / spec / f"{name}{suffix}").read_bytes() for spec in specs}
        assert len(contents) == 1, name


def test_bad_samples_of_a_foreign_shard_are_counted_by_key(tmp_path, teacher):
    keys = write_foreign_shards(tmp_path / "cc", broken={1: {"jpg": b"no jpeg at all", "txt": "broken"},
                                                         6: {"txt": "a caption without its image"}})
    summary = extract_features(tmp_path / "cc", tmp_path / "features", teacher, PARAMS)
    bad = [keys[0][1], keys[1][2]]
    assert summary["bad_samples"]["count"] == 2 and summary["bad_samples"]["keys"] == bad
    assert summary["bad_samples"]["reasons"][keys[1][2]] == "ValueError: no image in the shard for this key"
    assert feature_keys(tmp_path / "features", CC[:2]) == [[k for k in shard if k not in bad] for shard in keys[:2]]
    assert json.loads((tmp_path / "features" / "summary.json").read_text())["bad_samples"]["keys"] == bad


def test_done_foreign_shards_are_skipped_and_a_tar_added_later_is_the_only_one_computed(tmp_path, teacher):
    write_foreign_shards(tmp_path / "cc")
    output = tmp_path / "features"
    assert extract_features(tmp_path / "cc", output, teacher, PARAMS)["this_run"]["shards_computed"] == 3
    mtimes = {p.name: p.stat().st_mtime_ns for p in output.glob("*.parquet")}
    again = extract_features(tmp_path / "cc", output, teacher, PARAMS)
    assert again["this_run"]["shards_computed"] == 0 and again["this_run"]["shards_skipped"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in output.glob("*.parquet")} == mtimes
    [added] = write_foreign_shards(tmp_path / "cc", shards=1, pattern="laion-part-%d.tar")
    refresh = extract_features(tmp_path / "cc", output, teacher, PARAMS)
    assert refresh["this_run"]["shards_computed"] == 1 and refresh["this_run"]["shards_skipped"] == 3
    assert feature_keys(output, ["laion-part-0"]) == [added]
    assert {p.name: p.stat().st_mtime_ns for p in output.glob("cc-*.parquet")} == mtimes
    extract_features(tmp_path / "cc", tmp_path / "full", teacher, PARAMS)
    assert (output / "summary.json").read_bytes() == (tmp_path / "full" / "summary.json").read_bytes()


def test_a_download_folder_gives_its_complete_shards_and_another_folder_every_tar(shards, tmp_path):
    shutil.copy(shards / "00002.tar", shards / "00003.tar")  # no 00003_stats.json yet: still being written
    assert [tar.name for tar in list_shards(shards)] == ["00000.tar", "00001.tar", "00002.tar"]
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("00003.tar", "00010.tar", "00002.tar", "extra.tar"):
        shutil.copy(shards / "00002.tar", plain / name)
    assert [tar.name for tar in list_shards(plain)] == ["00002.tar", "00003.tar", "00010.tar", "extra.tar"]


def test_shards_with_one_name_or_a_pattern_naming_missing_files_are_one_clear_line(tmp_path, random_teacher):
    write_foreign_shards(tmp_path / "a", shards=1)
    write_foreign_shards(tmp_path / "b", shards=1)
    good = ["--output", str(tmp_path / "f"), "--model", TEST_MODEL, "--pretrained", str(random_teacher)]
    assert_one_line_error(invoke("--shards", str(tmp_path / "a"), "--shards", str(tmp_path / "b"), *good),
                          "have the same name 'cc-000000', so their features would be one file")
    assert_one_line_error(invoke("--shards", str(tmp_path / "a" / "cc-{000000..000001}.tar"), *good),
                          f"1 of the 2 shard(s) that {tmp_path / 'a'}/cc-{{000000..000001}}.tar names do not exist")
    assert not list((tmp_path / "f").glob("*.parquet"))


def test_torchrun_with_two_processes_writes_what_one_process_writes(tmp_path, teacher, random_teacher):
    write_foreign_shards(tmp_path / "cc", shards=4, per_shard=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs (OMP_NUM_THREADS=1): CPU results depend on it
    try:
        extract_features(tmp_path / "cc", tmp_path / "single", teacher, PARAMS)
    finally:
        torch.set_num_threads(threads)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "vlkd.cli", "features",
         "--shards", str(tmp_path / "cc" / "cc-{000000..000003}.tar"), "--output", str(tmp_path / "ranks"),
         "--model", TEST_MODEL, "--pretrained", str(random_teacher), "--device", "cpu", "--num-workers", "0",
         "--batch-size", str(PARAMS.batch_size), "--metrics", str(tmp_path / "metrics.json"),
         "--run-log", str(tmp_path / "run.json")],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = {p.name: p.read_bytes() for p in sorted((tmp_path / "single").iterdir())}
    assert sorted(single) == [*(f"cc-{i:06d}.parquet" for i in range(4)), "summary.json"]
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "ranks").iterdir())} == single
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(single["summary.json"])
    runs = [json.loads((tmp_path / f"run.rank-{rank}-of-2.json").read_text()) for rank in (0, 1)]
    assert [run["shards_computed"] for run in runs] == [2, 2]
