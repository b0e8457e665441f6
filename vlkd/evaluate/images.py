"""Teacher features of a benchmark's images, through the features stage's own code and format.

The images of a benchmark (a folder, named by `image_pattern`) are packed once into a webdataset shard
(`NNNNN.tar` + stats, the download stage's contract) together with one blank image for the blank-image
control; `extract_features` then embeds it exactly as it embeds the training shards, into the same
Parquet format, and skips it on the next run. So the student sees evaluation images processed like its
training images, and a new student is evaluated without running the teacher again.
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import torch
from PIL import Image

from vlkd.config import BenchmarkSpec
from vlkd.data.feature_store import FeatureStore
from vlkd.data.feature_writer import Encoding, extract_features
from vlkd.data.webdataset import add_member
from vlkd.errors import VlkdError
from vlkd.io import remove_path, write_json_atomic
from vlkd.models.teacher import Teacher
from vlkd.record import fingerprint

log = logging.getLogger(__name__)

BLANK_KEY = "blank"
BLANK_GREY = (128, 128, 128)
_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def image_features(spec: BenchmarkSpec, image_ids: list[int], teacher: Teacher, cache: Path,
                   patch: bool, device: str) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({image id: features}, blank-image features): pooled embeddings [E], or patch tokens [T, W]."""
    files = {image_id: spec.images / spec.image_pattern.format(image_id=image_id) for image_id in image_ids}
    missing = [path for path in files.values() if not path.is_file()]
    if missing:
        raise VlkdError(f"{len(missing)} evaluation image(s) missing, e.g. {missing[0]}; check the benchmark's "
                        "images folder and image_pattern in params.yaml")
    folder = cache / _content_key(files)
    shards, features = folder / "shards", folder / "features"
    if not (shards / "00000_stats.json").is_file():
        _pack(files, shards)
    # A cache, not an artifact: features of an earlier teacher are replaced, not refused.
    extract_features(shards, features, teacher,
                     Encoding(batch_size=64, num_workers=0, device=device, precision="auto", image_tokens=patch),
                     replace_other_teachers=True)
    column = "image_tokens" if patch else "image_embedding"
    store = FeatureStore(features, expected_teacher=teacher.fingerprint.as_dict())
    by_key = {key: row for batch in store.iter_batches(256, columns=[column])
              for key, row in zip(batch["key"], batch[column], strict=True)}
    undecodable = [image_id for image_id in image_ids if str(image_id) not in by_key]
    if undecodable:
        log.warning("%d evaluation image(s) could not be decoded and are left out, e.g. image %s (see %s)",
                    len(undecodable), undecodable[0], features / "summary.json")
    return {image_id: by_key[str(image_id)] for image_id in image_ids if str(image_id) in by_key}, by_key[BLANK_KEY]


def _content_key(files: dict[int, Path]) -> str:
    """Names the cache entry after what is in it: image ids, file names, sizes and modification times."""
    record = [(image_id, str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
              for image_id, path in sorted(files.items())]
    return fingerprint(record)[:16]


def _pack(files: dict[int, Path], shards: Path) -> None:
    remove_path(shards)
    shards.mkdir(parents=True)
    size = Image.open(next(iter(files.values()))).size if files else (64, 64)
    blank = io.BytesIO()
    Image.new("RGB", size, BLANK_GREY).save(blank, format="PNG")
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for image_id, path in files.items():
            add_member(tar, f"{image_id}.{_EXTENSIONS.get(path.suffix.lower(), 'jpg')}", path.read_bytes())
            add_member(tar, f"{image_id}.txt", b"")
        add_member(tar, f"{BLANK_KEY}.png", blank.getvalue())
        add_member(tar, f"{BLANK_KEY}.txt", b"")
    write_json_atomic(shards / "00000_stats.json", {"count": len(files) + 1, "successes": len(files) + 1,
                                                    "source": "evaluation images packed by vlkd evaluate"})

