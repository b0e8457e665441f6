"""Web-like noise in the world's training corpus (vlkd/world/noise.py): each share's rows, the record that
names them, what each kind of noise is, and that noise leaves the clean rows and the rest of the world as
the clean world has them."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

from vlkd.config import DownloadParams, SynthParams
from vlkd.errors import VlkdError
from vlkd.record import RECORD
from vlkd.world import noise
from vlkd.world.drawing import draw_scene
from vlkd.world.noise import BOILERPLATE, NEAR_DUPLICATES, NOISE_FILE, NOISE_KINDS, WEB_IMAGES
from vlkd.world.scenes import sample_scenes, stream
from vlkd.world.synth import WORLD_MANIFEST, generate_world

PROJECT = Path(__file__).resolve().parents[1]
SHARES = {"mismatched_captions": 0.15, "near_duplicates": 0.10, "exact_duplicates": 0.05,
          "boilerplate_captions": 0.05, "small_images": 0.05}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def clean_params() -> SynthParams:
    return SynthParams(images=100, eval_images=5, shifted_images=3, task_images=10, text_scenes=20,
                       pretrain_images=12, image_size=64, port=free_port())


@pytest.fixture(scope="module")
def clean(tmp_path_factory, clean_params) -> Path:
    root = tmp_path_factory.mktemp("clean") / "world"
    generate_world(root, clean_params)
    return root


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, clean_params) -> Path:
    root = tmp_path_factory.mktemp("noisy") / "world"
    generate_world(root, clean_params.model_copy(update=SHARES))
    return root


def _rows(root: Path) -> list[dict]:
    return pq.read_table(root / "urls.parquet").to_pylist()


def _record(root: Path) -> list[dict]:
    return pq.read_table(root / NOISE_FILE).to_pylist()


def _of_kind(root: Path, kind: str) -> list[dict]:
    rows = [row for row in _record(root) if row["noise"] == kind]
    assert rows, f"the test world has no {kind} row"
    return rows


def _file(root: Path, url: str) -> Path:
    return root / url.split("/", 3)[3]  # http://127.0.0.1:PORT/<path>


def _index(url: str) -> int:
    return int(Path(url).stem)


def _pixels(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    with Image.open(path) as image:
        image = image.convert("RGB")
        return np.asarray(image.resize(size, Image.Resampling.BILINEAR) if size else image, dtype=float)


def _files(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in root.rglob("*") if path.is_file()}


def _scenes(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "scenes/train.jsonl").read_text().splitlines()]


def _pairs(scene: dict) -> set[tuple[str, str]]:
    return {(obj["colour"], obj["shape"]) for obj in scene["objects"]}


# --- the rows and their record -----------------------------------------------------------------------
def test_each_share_is_its_rounded_count_of_rows_in_a_list_of_the_same_length(noisy, clean_params):
    rows, record = _rows(noisy), _record(noisy)
    assert len(rows) == clean_params.images  # noise replaces rows, it adds none
    expected = {kind: round(SHARES[share] * clean_params.images) for kind, share in NOISE_KINDS.items()}
    assert Counter(row["noise"] for row in record) == expected
    train = json.loads((noisy / WORLD_MANIFEST).read_text())["splits"]["train"]
    assert train["count"] == clean_params.images and train["noise_rows"] == expected
    assert train["noise"] == NOISE_FILE and train["web_images"] == WEB_IMAGES


def test_the_record_names_exactly_the_rows_that_differ_from_the_clean_world(noisy, clean):
    """Noise draws from streams of its own: every row it leaves clean is the clean world's row, URL,
    captions and image bytes, and every row it names is changed."""
    record = {row["url"] for row in _record(noisy)}
    assert len(record) == len(_record(noisy))
    changed = set()
    for row, clean_row in zip(_rows(noisy), _rows(clean), strict=True):
        if row != clean_row:
            changed.add(row["url"])
        else:
            assert _file(noisy, row["url"]).read_bytes() == _file(clean, row["url"]).read_bytes()
    assert changed == record
    assert {url for url in record if "/images/train/" in url} == {
        row["url"] for row in _record(noisy) if row["noise"] in ("mismatched_caption", "boilerplate_caption")}


def test_noise_leaves_every_other_file_of_the_world_as_it_was(noisy, clean):
    """Eval and shifted splits, tasks, text corpus, the teacher's pretraining shards, the training
    images and their scene records: byte for byte the clean world's. Only the list, its record and the
    noisy rows' own images are new."""
    noisy_files, clean_files = _files(noisy), _files(clean)
    differ = {name for name in noisy_files.keys() | clean_files.keys()
              if noisy_files.get(name) != clean_files.get(name)}
    assert {name for name in differ if not name.startswith(WEB_IMAGES + "/")} == {
        "urls.parquet", NOISE_FILE, WORLD_MANIFEST, RECORD}
    assert set(clean_files) <= set(noisy_files)
    for must_stay in ("pretrain/00000.tar", "tasks/images/train/000009.png", "images/eval/000004.png",
                      "scenes/train.jsonl", "text/train.txt", "vqa/annotations.json"):
        assert noisy_files[must_stay] == clean_files[must_stay]


def test_a_clean_world_has_no_record_and_a_manifest_without_the_shares(noisy, clean, clean_params):
    assert not (clean / NOISE_FILE).exists() and not (clean / WEB_IMAGES).exists()
    clean_manifest = json.loads((clean / WORLD_MANIFEST).read_text())
    assert not set(NOISE_KINDS.values()) & set(clean_manifest["params"])
    assert "noise" not in clean_manifest["splits"]["train"]
    noisy_manifest = json.loads((noisy / WORLD_MANIFEST).read_text())
    assert {share: noisy_manifest["params"][share] for share in NOISE_KINDS.values()} == SHARES
    assert NOISE_FILE in noisy_manifest["files"]
    assert all(name in noisy_manifest["files"] for name in _files(noisy) if name.startswith(WEB_IMAGES))


def test_the_same_shares_give_the_same_noisy_world(noisy, clean_params, tmp_path):
    generate_world(tmp_path / "again", clean_params.model_copy(update=SHARES))
    assert _files(tmp_path / "again") == _files(noisy)


# --- each kind of noise ------------------------------------------------------------------------------
def test_mismatched_captions_are_another_images_of_other_objects(noisy, clean):
    clean_rows, scenes = _rows(clean), _scenes(clean)
    by_captions = {tuple(row["captions"]): index for index, row in enumerate(clean_rows)}
    noisy_rows = _rows(noisy)
    for entry in _of_kind(noisy, "mismatched_caption"):
        index = _index(entry["url"])
        row = noisy_rows[index]
        assert row["url"] == clean_rows[index]["url"] and entry["duplicate_of"] is None  # its own image
        other = by_captions[tuple(row["captions"])]  # every caption is one other image's
        assert other != index and row["caption"] == row["captions"][0]
        assert not _pairs(scenes[index]) & _pairs(scenes[other])
    # The same rule over more rows than the world has.
    many, rng = sample_scenes(0, "train", 500), stream(0, "test", "mismatched")
    for index, scene in enumerate(many):
        other = noise._other_objects(index, many, rng)
        assert not {obj.pair for obj in scene.objects} & {obj.pair for obj in many[other].objects}


def test_boilerplate_captions_come_from_the_list(noisy, clean_params):
    patterns = [re.compile(re.escape(text).replace(r"\{n\}", r"\d+").replace(r"\{n:04d\}", r"\d{4}"))
                for text in BOILERPLATE]
    rows = _rows(noisy)
    for entry in _of_kind(noisy, "boilerplate_caption"):
        captions = rows[_index(entry["url"])]["captions"]
        assert len(captions) == clean_params.captions_per_image
        assert all(any(pattern.fullmatch(text) for pattern in patterns) for text in captions), captions


def test_exact_duplicates_are_their_originals_bytes_at_another_url(noisy):
    for entry in _of_kind(noisy, "exact_duplicate"):
        assert entry["url"] != entry["duplicate_of"] and f"/{WEB_IMAGES}/" in entry["url"]
        assert _file(noisy, entry["url"]).read_bytes() == _file(noisy, entry["duplicate_of"]).read_bytes()


def test_near_duplicates_are_close_to_their_original_but_not_its_bytes(noisy, clean_params):
    side = clean_params.image_size
    train = [_pixels(path) for path in sorted((noisy / "images/train").iterdir())]
    for entry in _of_kind(noisy, "near_duplicate"):
        copy, original = _file(noisy, entry["url"]), _file(noisy, entry["duplicate_of"])
        assert copy.read_bytes() != original.read_bytes()
        pixels = _pixels(copy, (side, side))
        distances = [np.abs(pixels - image).mean() for image in train]
        to_original = distances[_index(entry["duplicate_of"])]
        assert 0 < to_original < 8, entry  # mean difference in 0-255 levels
        assert to_original < 0.25 * np.median(distances), entry


@pytest.mark.parametrize("variant", NEAR_DUPLICATES)
def test_each_kind_of_near_duplicate_changes_the_bytes_and_little_else(variant, monkeypatch):
    monkeypatch.setattr(noise, "NEAR_DUPLICATES", (variant,))
    scenes = sample_scenes(0, "train", 20)
    images = [draw_scene(scene, 96) for scene in scenes]
    rng = stream(0, "test", variant)
    for index in (0, 7):
        data, extension = noise._near_duplicate(images[index], rng)
        with Image.open(io.BytesIO(data)) as decoded:
            assert (decoded.format, extension) == (("JPEG", "jpg") if variant == "jpeg" else ("PNG", "png"))
            same_size = variant in ("jpeg", "shift")
            assert (decoded.size == (96, 96)) == same_size
            pixels = np.asarray(decoded.convert("RGB").resize((96, 96), Image.Resampling.BILINEAR), dtype=float)
        distances = [np.abs(pixels - np.asarray(image, dtype=float)).mean() for image in images]
        assert 0 < distances[index] < 8
        assert int(np.argmin(distances)) == index


def test_duplicates_copy_clean_rows_with_captions_of_the_same_scene(noisy):
    noisy_rows, scenes = _rows(noisy), _scenes(noisy)
    noisy_urls = {row["url"] for row in _record(noisy)}
    own = new = 0
    for kind in ("near_duplicate", "exact_duplicate"):
        for entry in _of_kind(noisy, kind):
            assert entry["duplicate_of"] not in noisy_urls  # an original is a clean row
            original = _index(entry["duplicate_of"])
            captions = noisy_rows[_index(entry["url"])]["captions"]
            if captions == noisy_rows[original]["captions"]:
                own += 1
                continue
            new += 1
            names = {f"{colour} {shape}" for colour, shape in _pairs(scenes[original])}
            assert all(any(name in text for name in names) for text in captions), (captions, names)
    assert own and new  # both kinds of caption, even odds


def test_small_images_are_tiny_or_of_an_extreme_aspect(noisy, clean):
    clean_rows = _rows(clean)
    kinds = Counter()
    for entry in _of_kind(noisy, "small_image"):
        with Image.open(_file(noisy, entry["url"])) as image:
            width, height = image.size
        tiny = max(width, height) <= 32
        assert tiny or max(width, height) / min(width, height) >= 3, (width, height)
        kinds["tiny" if tiny else "aspect"] += 1
        assert entry["duplicate_of"] is None
        assert _rows(noisy)[_index(entry["url"])]["captions"] == clean_rows[_index(entry["url"])]["captions"]
    assert set(kinds) == {"tiny", "aspect"}


# --- the shares' limits ------------------------------------------------------------------------------
def test_the_shares_must_leave_clean_rows():
    with pytest.raises(ValidationError, match="must sum to less than 1"):
        SynthParams(mismatched_captions=0.5, near_duplicates=0.3, small_images=0.2)
    with pytest.raises(ValidationError):
        SynthParams(boilerplate_captions=1.5)
    # Rounding can still leave none in a tiny list: one clear error, not a duplicate of nothing.
    tiny = SynthParams(images=2, eval_images=1, shifted_images=1, task_images=1, text_scenes=10, pretrain_images=0,
                       mismatched_captions=0.45, near_duplicates=0.45)
    with pytest.raises(VlkdError, match="leave none clean"):
        noise._noisy_rows(tiny, noise.noise_counts(tiny))


# --- downstream -------------------------------------------------------------------------------------
def test_a_noisy_world_downloads_whole_with_border_resizing(noisy, tmp_path):
    """img2dataset's `border` resize takes tiny and 5:1 images (padded to a square), and its shard
    metadata keep what a filter reads: the original size, and the same sha256 for exact duplicates."""
    from vlkd.corpus.download import download
    from vlkd.world.server import world_server

    with world_server(noisy / "urls.parquet"):
        summary = download(noisy / "urls.parquet", tmp_path / "shards",
                           DownloadParams(processes=1, shard_size=100, image_size=32, captions_col="captions",
                                          resize_mode="border"))
    assert summary["url_list"]["successes"] == len(_rows(noisy))
    shard = {row["url"]: row for row in pq.read_table(tmp_path / "shards/00000.parquet").to_pylist()}
    for entry in _of_kind(noisy, "small_image"):
        with Image.open(_file(noisy, entry["url"])) as image:
            assert (shard[entry["url"]]["original_width"], shard[entry["url"]]["original_height"]) == image.size
        assert (shard[entry["url"]]["width"], shard[entry["url"]]["height"]) == (32, 32)
    for entry in _of_kind(noisy, "exact_duplicate"):
        assert shard[entry["url"]]["sha256"] == shard[entry["duplicate_of"]]["sha256"]
    for entry in _of_kind(noisy, "near_duplicate"):
        assert shard[entry["url"]]["sha256"] != shard[entry["duplicate_of"]]["sha256"]


def test_the_noisy_overlay_changes_only_the_worlds_noise():
    overlay = yaml.safe_load((PROJECT / "configs/embedded-noisy.yaml").read_text())
    assert overlay.pop("base") == "configs/embedded.yaml"
    assert set(overlay) == {"synth"} and set(overlay["synth"]) == set(NOISE_KINDS.values())
    recipe = yaml.safe_load((PROJECT / "configs/embedded.yaml").read_text())["synth"]
    params = SynthParams(**(recipe | overlay["synth"]))
    assert all(0 < getattr(params, share) < 0.5 for share in NOISE_KINDS.values())
