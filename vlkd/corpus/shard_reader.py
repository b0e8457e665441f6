"""Streaming the samples of a webdataset shard written by the download stage.

A plain `tarfile` stream rather than `webdataset.WebDataset`: the stages downstream must report the key
of every sample they could not decode, and webdataset's error handlers drop a bad sample without it.
Streaming keeps memory at one sample, whatever the shard's size.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vlkd.corpus import shards
from vlkd.errors import VlkdError

IMAGE_EXTENSIONS = ("jpg", "png", "webp")


@dataclass(frozen=True)
class ShardSample:
    key: str
    image: bytes | None  # encoded image, None when the shard holds none for this key
    caption: str
    captions: tuple[str, ...]  # every caption of the image, `caption` first (just `caption` without a list)


def list_shards(folder: Path) -> list[Path]:
    """The tar files of the complete shards in `folder`, in shard order."""
    if not folder.is_dir():
        raise VlkdError(f"shard folder {folder} does not exist; run `vlkd download` first or check --shards")
    return [folder / f"{shard_id:05d}.tar" for shard_id in shards.complete_shards(folder)]


def iter_shard(tar_path: Path) -> Iterator[ShardSample]:
    """The samples of one shard in file order; files of one sample are consecutive in a webdataset tar."""
    key, files = None, {}
    with tarfile.open(tar_path, mode="r|") as tar:
        for member in tar:
            if not member.isfile() or "." not in member.name:
                continue
            member_key, extension = member.name.split(".", 1)
            if member_key != key and key is not None:
                yield _sample(key, files)
                files = {}
            key = member_key
            files[extension] = tar.extractfile(member).read()
    if key is not None:
        yield _sample(key, files)


def _sample(key: str, files: dict[str, bytes]) -> ShardSample:
    image = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
    caption = files.get("txt", b"").decode("utf-8", errors="replace")
    return ShardSample(key=key, image=image, caption=caption, captions=_captions(files.get("json"), caption))


def _captions(meta: bytes | None, caption: str) -> tuple[str, ...]:
    """The `captions` list img2dataset saved in the sample's json (download.captions_col), else (caption,)."""
    try:
        listed = json.loads(meta).get("captions") if meta else None
    except (ValueError, AttributeError):
        listed = None
    if not isinstance(listed, list):
        return (caption,)
    return tuple(dict.fromkeys([caption, *(text for text in listed if isinstance(text, str) and text)]))
