"""The filter's output, the contract between the filter stage and distillation.

For each feature file `NAME.parquet` the filter writes, in its folder:
  kept/NAME.parquet     the rows distillation may train on: `row` (int32, the row's index in the feature
                        file), `key`, `cluster` (int32, the row's SemDeDup cluster; -1 without semantic
                        dedup) and `sha256` (the image's, or null), in row order
  rejects/NAME.parquet  every other row: `row`, `key`, `caption`, `reason` (REASONS), `clip_score`,
                        `duplicate_of` ("FILE/key" of the kept row it duplicates, or null), `similarity`
Both carry the file-level metadata key `vlkd.filter`: the feature file's sha256 and the chain digest that
says the file was filtered after the same earlier files with the same rules (see vlkd/filter/run.py).
kept + rejects = the feature file's rows, each once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlkd.errors import VlkdError

METADATA_KEY = b"vlkd.filter"
KEPT = "kept"
REJECTS = "rejects"
# Why a row is not kept, in the order the rules apply: a row gets the first reason that holds.
REASONS = ("non_finite_embedding", "no_metadata", "image_too_small", "extreme_aspect_ratio", "caption_too_short",
           "boilerplate_caption", "language", "low_clip_score", "exact_duplicate", "near_duplicate")

KEPT_SCHEMA = pa.schema([("row", pa.int32()), ("key", pa.string()), ("cluster", pa.int32()), ("sha256", pa.string()),
                         ("clip_score", pa.float32())])
REJECTS_SCHEMA = pa.schema([("row", pa.int32()), ("key", pa.string()), ("caption", pa.string()),
                            ("reason", pa.string()), ("clip_score", pa.float32()), ("duplicate_of", pa.string()),
                            ("similarity", pa.float32())])


def kept_path(folder: Path, feature_file: str) -> Path:
    return Path(folder) / KEPT / feature_file


def rejects_path(folder: Path, feature_file: str) -> Path:
    return Path(folder) / REJECTS / feature_file


def read_record(path: Path) -> dict | None:
    """The `vlkd.filter` metadata of a kept or rejects file, or None (absent or not the filter's)."""
    if not path.is_file():
        return None
    try:
        raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    except (OSError, pa.ArrowInvalid):
        return None
    return json.loads(raw) if raw else None


def kept_rows(folder: Path, feature_files: dict[str, str]) -> dict[str, np.ndarray]:
    """{feature file name: the indices of its kept rows} for the feature files given with their sha256.
    Refuses a filter output that is missing a file or was made from other bytes of it: distillation would
    otherwise train on rows chosen for another corpus."""
    rows = {}
    for name, sha256 in sorted(feature_files.items()):
        path = kept_path(folder, name)
        record = read_record(path)
        if record is None:
            raise VlkdError(f"{path} is missing: the filter has not seen feature file {name}; run `vlkd filter` "
                            "(or set distill.kept: null to train on every row)")
        if record.get("features_sha256") != sha256:
            raise VlkdError(f"{path} was filtered from other bytes of {name} than the feature folder holds now; "
                            "run `vlkd filter` again")
        rows[name] = pq.read_table(path, columns=["row"]).column("row").to_numpy().astype(np.int64)
    return rows
