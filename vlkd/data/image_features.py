"""Teacher features of loose images (files or encoded bytes), through the features stage's own code and format.

The images are packed into one webdataset shard (`00000.tar` + stats, the download stage's contract),
optionally with one blank grey image for the blank-image control, and `extract_features` embeds it exactly
as it embeds the training shards, into the same Parquet format. So evaluation images and a user's images
(`vlkd predict`) are decoded, preprocessed and encoded like the student's training images, and a folder
already embedded by this teacher is not embedded again.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from vlkd.data.feature_schema import read_bad_samples
from vlkd.data.feature_store import FeatureStore
from vlkd.data.feature_writer import Encoding, extract_features, output_path
from vlkd.data.webdataset import add_member
from vlkd.io import remove_path, write_json_atomic

if TYPE_CHECKING:
    from vlkd.models.teacher import Teacher

log = logging.getLogger(__name__)

BLANK_KEY = "blank"
BLANK_GREY = (128, 128, 128)
SHARD = "00000.tar"
EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


Embedded = tuple[dict[str, torch.Tensor], "torch.Tensor | None", dict[str, str]]


def embed_images(images: Mapping[str, Path | bytes], teacher: Teacher, folder: Path, patch: bool, device: str,
                 blank: bool = False, batch_size: int = 64, precision: str = "auto") -> Embedded:
    """({key: features}, the blank image's features or None, {key: why the image could not be decoded}).

    Features are pooled embeddings [E], or with `patch` the teacher's image tokens [T, W]. `folder` holds
    the packed shard and its features: packed once (a folder whose shard exists is reused as it is, so name
    it after its content) and embedded when not up to date with this teacher. Keys are webdataset keys: no
    dots or slashes."""
    shards, features = folder / "shards", folder / "features"
    if not (shards / "00000_stats.json").is_file():
        pack_images(images, shards, blank)
    # A cache, not an artifact: features of an earlier teacher are replaced, not refused.
    extract_features(shards, features, teacher,
                     Encoding(batch_size=batch_size, num_workers=0, device=device, precision=precision,
                              image_tokens=patch),
                     replace_other_teachers=True)
    column = "image_tokens" if patch else "image_embedding"
    store = FeatureStore(features, expected_teacher=teacher.fingerprint.as_dict())
    by_key = {key: row for batch in store.iter_batches(256, columns=[column])
              for key, row in zip(batch["key"], batch[column], strict=True)}
    undecodable = dict(read_bad_samples(output_path(features, shards / SHARD)))
    blank_features = by_key.pop(BLANK_KEY, None) if blank else None
    return by_key, blank_features, undecodable


def pack_images(images: Mapping[str, Path | bytes], shards: Path, blank: bool) -> None:
    """One shard of `images` (each member the file's own bytes, captions empty), the blank image last."""
    remove_path(shards)
    shards.mkdir(parents=True)
    with tarfile.open(shards / SHARD, "w") as tar:
        for key, image in images.items():
            if isinstance(image, Path):
                add_member(tar, f"{key}.{EXTENSIONS.get(image.suffix.lower(), 'jpg')}", image.read_bytes())
            else:
                add_member(tar, f"{key}.png", image)
            add_member(tar, f"{key}.txt", b"")
        if blank:
            add_member(tar, f"{BLANK_KEY}.png", blank_png(_first_size(images)))
            add_member(tar, f"{BLANK_KEY}.txt", b"")
    count = len(images) + int(blank)
    write_json_atomic(shards / "00000_stats.json", {"count": count, "successes": count,
                                                    "source": "images packed by vlkd for the teacher"})


def blank_png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, BLANK_GREY).save(buffer, format="PNG")
    return buffer.getvalue()


def _first_size(images: Mapping[str, Path | bytes]) -> tuple[int, int]:
    """The blank image takes the first image's size (the preprocessing resizes either way)."""
    for image in images.values():
        try:
            return Image.open(image if isinstance(image, Path) else io.BytesIO(image)).size
        except Exception:  # noqa: BLE001 (an undecodable first image: any size will do)
            break
    return (64, 64)
