"""The filter stage: each rule drops what it names and nothing else, every row is accounted for once,
duplicates keep the earliest row, a refresh filters only new files against every row kept before, and
bad input gets one clear line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from vlkd.cli import main
from vlkd.config import FilterParams
from vlkd.data.feature_schema import feature_schema, fixed_size_array
from vlkd.data.kept_rows import REASONS, kept_path, kept_rows, rejects_path
from vlkd.distill.rows import continuation_rows
from vlkd.errors import VlkdError
from vlkd.filter.run import filter_corpus
from vlkd.record import files_sha256

DIM = 16
TEACHER = {"model": "test-teacher", "weights_sha256": "0" * 64, "open_clip": "0"}
CAPTIONS = ["a small brown dog is running across the green grass in the park",
            "a red car is parked on the street next to the old building",
            "two children are playing football on the beach in the summer",
            "a bowl of fresh fruit is standing on the wooden kitchen table",
            "a large white ship is sailing on the blue sea under the clouds",
            "an old man is reading a newspaper on a bench in the garden"]


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector, axis=-1, keepdims=True)


class Corpus:
    """Feature files and img2dataset metadata written as the features and download stages write them."""

    def __init__(self, root: Path, seed: int = 0):
        self.features, self.shards = root / "features", root / "shards"
        self.features.mkdir(parents=True)
        self.shards.mkdir()
        self.rng = np.random.default_rng(seed)

    def row(self, caption: str | None = None, size=(256, 256), image: np.ndarray | None = None,
            text: np.ndarray | None = None, sha: str | None = None) -> dict:
        """A well-matched pair by default: its caption embedding near its image embedding."""
        image = unit(self.rng.normal(size=DIM)) if image is None else image
        text = unit(image + 0.3 * unit(self.rng.normal(size=DIM))) if text is None else text
        return {"caption": caption or str(self.rng.choice(CAPTIONS)), "size": size, "image": image, "text": text,
                "sha": sha or hashlib.sha256(self.rng.bytes(16)).hexdigest()}

    def write(self, number: int, rows: list[dict], metadata: bool = True) -> Path:
        keys = [f"{number:05d}{i:04d}" for i in range(len(rows))]
        schema = feature_schema(DIM, None, {"teacher": TEACHER, "embed_dim": DIM, "shard": f"{number:05d}.tar"})
        table = pa.table({"key": keys, "caption": [r["caption"] for r in rows],
                          "captions": [[r["caption"]] for r in rows],
                          "image_embedding": fixed_size_array(np.stack([r["image"] for r in rows])),
                          "text_embedding": fixed_size_array(np.stack([r["text"] for r in rows]))}, schema=schema)
        path = self.features / f"{number:05d}.parquet"
        pq.write_table(table, path)
        if metadata:
            pq.write_table(pa.table({"key": keys, "status": ["success"] * len(rows),
                                     "original_width": [r["size"][0] for r in rows],
                                     "original_height": [r["size"][1] for r in rows],
                                     "sha256": [r["sha"] for r in rows]}), self.shards / f"{number:05d}.parquet")
        return path

    def params(self, output: Path, **rules) -> FilterParams:
        defaults = {"clip_score_min": 0.5, "semdedup_clusters": 2, "semdedup_eps": 0.01, "min_image_side": 100}
        return FilterParams(features=self.features, shards=self.shards, output=output, **{**defaults, **rules})


def reasons(output: Path, name: str = "00000.parquet") -> dict[str, str]:
    table = pq.read_table(rejects_path(output, name))
    return dict(zip(table.column("key").to_pylist(), table.column("reason").to_pylist(), strict=True))


def kept_keys(output: Path, name: str = "00000.parquet") -> list[str]:
    return pq.read_table(kept_path(output, name)).column("key").to_pylist()


@pytest.fixture
def corpus(tmp_path) -> Corpus:
    return Corpus(tmp_path)


def test_each_rule_drops_its_row_and_nothing_else(corpus, tmp_path):
    image = unit(np.ones(DIM))
    rows = [corpus.row() for _ in range(6)]
    broken = {
        "non_finite_embedding": corpus.row(image=np.full(DIM, np.nan)),
        "image_too_small": corpus.row(size=(64, 300)),
        "extreme_aspect_ratio": corpus.row(size=(1200, 300)),
        "caption_too_short": corpus.row(caption="a dog"),
        "boilerplate_caption": corpus.row(caption="Royalty-free stock photo."),
        "language": corpus.row(caption="un petit chien brun court dans l'herbe verte du jardin public"),
        "low_clip_score": corpus.row(image=image, text=unit(-image + 0.1)),
        "exact_duplicate": None,
        "near_duplicate": None,
    }
    broken["exact_duplicate"] = {**corpus.row(), "sha": rows[0]["sha"]}
    broken["near_duplicate"] = corpus.row(image=unit(rows[1]["image"] + 0.01 * unit(np.ones(DIM))))
    corpus.write(0, rows + list(broken.values()))
    output = tmp_path / "filtered"
    summary = filter_corpus(corpus.params(output))

    keys = [f"00000{i:04d}" for i in range(len(rows) + len(broken))]
    expected = dict(zip(keys[len(rows):], broken, strict=True))
    assert reasons(output) == expected
    assert kept_keys(output) == keys[:len(rows)]
    assert summary["rows"] == len(keys) and summary["kept"] == len(rows)
    assert summary["dropped"] == {reason: int(reason in broken) for reason in REASONS}
    duplicates = pq.read_table(rejects_path(output, "00000.parquet")).to_pylist()[-2:]
    assert [d["duplicate_of"] for d in duplicates] == [f"00000.parquet/{keys[0]}", f"00000.parquet/{keys[1]}"]
    assert duplicates[1]["similarity"] >= 0.99
    report = (output / "report.html").read_text()
    assert "<svg" in report and "threshold 0.500" in report  # the histogram with its threshold drawn
    assert all(f"<b>{reason.replace('_', ' ')}</b>" in report for reason in broken)  # a sample of each reason


@pytest.mark.parametrize("caption", ["image", "Untitled", "IMG_0412.jpg", "DSC_1234", "click to enlarge",
                                     "photo 3", "holiday-2019.png"])
def test_boilerplate_captions_are_named(corpus, tmp_path, caption):
    corpus.write(0, [corpus.row(), corpus.row(caption=caption)])
    output = tmp_path / "filtered"
    filter_corpus(corpus.params(output, min_caption_words=0, min_caption_chars=0, languages=None))
    assert reasons(output) == {"000000001": "boilerplate_caption"}


def test_a_fraction_or_a_quantile_becomes_a_threshold_recorded_at_the_first_run(corpus, tmp_path):
    rows = [corpus.row(text=unit(corpus.rng.normal(size=DIM))) for _ in range(40)]
    corpus.write(0, rows)
    output = tmp_path / "filtered"
    summary = filter_corpus(corpus.params(output, clip_score_min=None, clip_score_top=0.25, semdedup_clusters=None,
                                          languages=None))
    assert summary["kept"] == 10
    threshold = summary["clip_score"]["threshold"]
    # A refresh whose rows all score below the recorded threshold keeps none of them: the threshold stays.
    corpus.write(1, [corpus.row(image=r["image"], text=unit(-r["image"])) for r in rows[:10]])
    again = filter_corpus(corpus.params(output, clip_score_min=None, clip_score_top=0.25, semdedup_clusters=None,
                                        languages=None))
    assert again["clip_score"]["threshold"] == threshold
    assert kept_keys(output, "00001.parquet") == []

    null_output = tmp_path / "null"
    summary = filter_corpus(corpus.params(null_output, clip_score_min=None, clip_score_null_quantile=0.9,
                                          semdedup_clusters=None, languages=None))
    assert summary["clip_score"]["rule"] == "clip_score_null_quantile"
    assert -1 < summary["clip_score"]["threshold"] < 1


def test_the_same_inputs_give_the_same_bytes(corpus, tmp_path):
    corpus.write(0, [corpus.row() for _ in range(30)])
    corpus.write(1, [corpus.row() for _ in range(30)])
    first, second = tmp_path / "a", tmp_path / "b"
    filter_corpus(corpus.params(first, semdedup_clusters=4, semdedup_eps=0.2))
    filter_corpus(corpus.params(second, semdedup_clusters=4, semdedup_eps=0.2))
    for relative in ("kept/00000.parquet", "rejects/00001.parquet", "state.json", "centroids.npy", "summary.json",
                     "report.html"):
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


def test_a_refresh_filters_only_new_files_against_every_row_kept_before(corpus, tmp_path):
    old = [corpus.row() for _ in range(20)]
    corpus.write(0, old)
    output = tmp_path / "filtered"
    params = corpus.params(output)
    filter_corpus(params)
    before = {path: path.read_bytes() for path in (output / "kept").glob("*")} | {
        output / "rejects/00000.parquet": (output / "rejects/00000.parquet").read_bytes(),
        output / "state.json": (output / "state.json").read_bytes()}
    stamps = {path: path.stat().st_mtime_ns for path in before}

    new = [corpus.row(), {**corpus.row(), "sha": old[3]["sha"]},
           corpus.row(image=unit(old[5]["image"] + 0.01 * unit(np.ones(DIM))))]
    corpus.write(1, new)
    summary = filter_corpus(params)
    assert summary["this_run"] == {**summary["this_run"], "files_filtered": 1, "files_reused": 1}
    assert {path: path.read_bytes() for path in before} == before
    assert {path: path.stat().st_mtime_ns for path in before} == stamps
    assert reasons(output, "00001.parquet") == {"000010001": "exact_duplicate", "000010002": "near_duplicate"}
    duplicates = pq.read_table(rejects_path(output, "00001.parquet")).column("duplicate_of").to_pylist()
    assert duplicates == ["00000.parquet/000000003", "00000.parquet/000000005"]
    assert summary["rows"] == 23


def test_a_changed_rule_filters_every_file_again(corpus, tmp_path):
    corpus.write(0, [corpus.row() for _ in range(10)])
    corpus.write(1, [corpus.row() for _ in range(10)])
    output = tmp_path / "filtered"
    filter_corpus(corpus.params(output))
    assert filter_corpus(corpus.params(output))["this_run"]["files_filtered"] == 0
    assert filter_corpus(corpus.params(output, min_caption_words=40))["this_run"]["files_filtered"] == 2
    assert filter_corpus(corpus.params(output, min_caption_words=40))["kept"] == 0


def test_distillation_reads_only_kept_rows_and_refuses_a_stale_filter(corpus, tmp_path):
    rows = [corpus.row() for _ in range(8)]
    rows[2] = corpus.row(caption="image")
    path = corpus.write(0, rows)
    output = tmp_path / "filtered"
    filter_corpus(corpus.params(output))
    digests = dict(zip([path.name], files_sha256([path]), strict=True))
    kept = kept_rows(output, digests)
    assert kept["00000.parquet"].tolist() == [0, 1, 3, 4, 5, 6, 7]
    # A refresh's unseen and replayed rows are kept rows too.
    selection = continuation_rows(kept, {"00000.parquet": 4}, replay=1.0, seed=0)
    assert set(selection.rows["00000.parquet"].tolist()) <= {0, 1, 3, 4, 5, 6, 7}
    assert selection.new == 4 and selection.replayed == 3
    corpus.write(0, rows[:7])
    with pytest.raises(VlkdError, match="other bytes"):
        kept_rows(output, dict(zip([path.name], files_sha256([path]), strict=True)))


def test_bad_input_gets_one_clear_line(corpus, tmp_path):
    corpus.write(0, [corpus.row() for _ in range(4)], metadata=False)
    output = tmp_path / "filtered"
    with pytest.raises(VlkdError, match=r"00000\.parquet is missing: the filter's image-size"):
        filter_corpus(corpus.params(output))
    # Without the rules that need metadata, the same folder filters.
    assert filter_corpus(corpus.params(output, min_image_side=None, max_aspect_ratio=None,
                                       exact_duplicates=False))["rows"] == 4

    other = Corpus(tmp_path / "other")
    other.write(0, [other.row() for _ in range(4)])
    TEACHER_B = {**TEACHER, "weights_sha256": "1" * 64}
    schema = feature_schema(DIM, None, {"teacher": TEACHER_B, "embed_dim": DIM, "shard": "00001.tar"})
    pq.write_table(pq.read_table(other.features / "00000.parquet").cast(schema), other.features / "00001.parquet")
    with pytest.raises(VlkdError, match="different teachers"):
        filter_corpus(other.params(tmp_path / "other-out"))


def test_the_cli_refuses_a_threshold_out_of_range_in_one_line(corpus, tmp_path):
    corpus.write(0, [corpus.row() for _ in range(4)])
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"filter:\n  features: {corpus.features}\n  shards: {corpus.shards}\n"
                           f"  output: {tmp_path / 'out'}\n  clip_score_min: 1.5\n")
    result = CliRunner().invoke(main, ["--params", str(params_file), "filter"])
    assert result.exit_code == 2
    assert "filter.clip_score_min" in result.output and len(result.output.strip().splitlines()) == 1

    params_file.write_text(f"filter:\n  features: {corpus.features}\n  shards: {corpus.shards}\n"
                           f"  output: {tmp_path / 'out'}\n  semdedup_clusters: 2\n  clip_score_min: 0.2\n"
                           "  min_image_side: 100\n")
    metrics = tmp_path / "metrics.json"
    result = CliRunner().invoke(main, ["--params", str(params_file), "filter", "--metrics", str(metrics)])
    assert result.exit_code == 0, result.output
    assert json.loads(metrics.read_text())["rows"] == 4
    assert "4 of 4 rows kept" in result.output
