"""The shard folder: which shards are complete, what every URL's latest status is, adopting new shards.

A shard `NNNNN` is complete when its `NNNNN_stats.json` exists: img2dataset writes it after closing the
tar and the parquet, and `adopt` moves it into place last. Anything else in the folder that looks like a
shard is the leftover of a killed run and is removed, so readers never see a truncated shard.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlkd.corpus.keys import CAPTION_KEY, URL_KEY, caption_keys, find, url_keys
from vlkd.data.webdataset import STATS_SUFFIX
from vlkd.io import write_json_atomic

log = logging.getLogger(__name__)

SHARD_FILE = re.compile(r"^(\d{5,})(\.tar|\.parquet|_stats\.json)$")
# What img2dataset's stats file says about the run rather than the shard (wall-clock times).
RUN_FIELDS = ("start_time", "end_time", "duration")
SHARD_SUFFIXES = (".tar", ".parquet", STATS_SUFFIX)  # the order in which a shard is moved into place


SUCCESS = -1  # a ledger outcome: the URL's latest attempt gave a sample; other outcomes index `reasons`


@dataclass(frozen=True)
class Ledger:
    """The latest attempt at every URL the shards hold, as arrays aligned with `keys` (keys.py): 28 bytes a
    URL, where Python strings in a dict took about ten times that, and growing with every shard."""

    keys: np.ndarray  # URL keys, sorted, each once
    outcomes: np.ndarray  # int32: SUCCESS, or the index of the failure's reason in `reasons`
    reasons: list[str]  # failure reasons (`failure_reason`), each once
    caption_keys: np.ndarray  # of what the URL was stored with, as `read_ledger` was asked (else empty)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """For each URL key, its index in the ledger, or -1 where the shards do not hold it."""
        return find(self.keys, keys)


# img2dataset's messages for common failures, and the line a person should read instead.
_KNOWN_FAILURES = (
    ("!buf.empty()", "empty response body"),
    ("Image decoding error", "not a decodable image (HTML page, truncated or corrupt file)"),
    ("infinite loop", "redirect loop"),
    ("timed out", "timed out"),
    ("image area too large", "image area too large (download.max_image_area)"),
    ("disallowed by X-Robots-Tag", "opted out by the site (X-Robots-Tag; download.disallowed_header_directives)"),
)


def failure_reason(message: str) -> str:
    """One short line per kind of failure, so failures group by reason."""
    for needle, reason in _KNOWN_FAILURES:
        if needle in message:
            return reason
    return " ".join(message.split())[:200]


def shard_ids(folder: Path) -> dict[int, list[Path]]:
    """Files that belong to numbered shards, by shard id."""
    shards: dict[int, list[Path]] = {}
    if not folder.is_dir():
        return shards
    for path in folder.iterdir():
        match = SHARD_FILE.match(path.name)
        if match:
            shards.setdefault(int(match.group(1)), []).append(path)
    return shards


def _is_complete(files: list[Path]) -> bool:
    return any(path.name.endswith(STATS_SUFFIX) for path in files)


def complete_shards(folder: Path) -> list[int]:
    return sorted(i for i, files in shard_ids(folder).items() if _is_complete(files))


def remove_incomplete(folder: Path) -> list[int]:
    """Delete shards without their stats file (a killed run's partial output); returns their ids."""
    removed = []
    for shard_id, files in sorted(shard_ids(folder).items()):
        if not _is_complete(files):
            for path in files:
                path.unlink()
            removed.append(shard_id)
    if removed:
        log.warning("removed %d incomplete shard(s) left by an interrupted run: %s", len(removed), removed)
    return removed


def adopt(staging: Path, output: Path) -> list[int]:
    """Move the complete shards from `staging` into `output`, the stats file last; returns their ids."""
    adopted = []
    for shard_id in complete_shards(staging):
        stats = staging / f"{shard_id:05d}{STATS_SUFFIX}"
        if stats.exists():
            _drop_run_fields(stats)
        for suffix in SHARD_SUFFIXES:
            name = f"{shard_id:05d}{suffix}"
            if (staging / name).exists():  # a previous adopt may have been killed half-way
                (staging / name).replace(output / name)
        adopted.append(shard_id)
    return adopted


def _drop_run_fields(stats: Path) -> None:
    """img2dataset's stats without its wall-clock times, keys sorted: the file is part of the shard, so
    it must depend on the shard's rows only (idempotent, atomic)."""
    record = json.loads(stats.read_text())
    write_json_atomic(stats, {name: value for name, value in record.items() if name not in RUN_FIELDS})


def next_shard_id(output: Path) -> int:
    """New shards are numbered after every existing one, so finished shards are never rewritten."""
    return max(shard_ids(output), default=-1) + 1


def read_ledger(output: Path, captions: Literal["caption", "caption and list"] | None = None) -> Ledger:
    """The latest status of each URL over all complete shards (a retried URL's later shard wins), with, if
    asked, keys of the caption it was stored with, or of the caption and caption list (the list null for
    shards written without download.captions_col)."""
    reasons: dict[str, int] = {}
    parts: list[tuple[np.ndarray, ...]] = []
    # The latest shard first, each shard's rows in order: a URL's first row is then its latest attempt.
    for shard_id in reversed(complete_shards(output)):
        path = output / f"{shard_id:05d}.parquet"
        listed = ["captions"] if "captions" in pq.read_schema(path).names else []
        listed = listed if captions == "caption and list" else []
        table = pq.read_table(path, columns=["url", "status", "error_message", *(["caption"] if captions else []),
                                             *listed])
        outcomes = [SUCCESS if status == "success" else reasons.setdefault(failure_reason(error or status),
                                                                           len(reasons))
                    for status, error in zip(table.column("status").to_pylist(),
                                             table.column("error_message").to_pylist(), strict=True)]
        parts.append((url_keys(table.column("url")), np.array(outcomes, np.int32),
                      _stored_caption_keys(table, captions)))
    if not parts:
        return Ledger(np.empty(0, URL_KEY), np.empty(0, np.int32), [], np.empty(0, CAPTION_KEY))
    keys, outcomes, stored = (np.concatenate(columns) for columns in zip(*parts, strict=True))
    keys, first = np.unique(keys, return_index=True)  # stable: the first row of each URL
    return Ledger(keys, outcomes[first], list(reasons), stored[first] if captions else stored)


def _stored_caption_keys(table: pa.Table, captions: str | None) -> np.ndarray:
    if captions is None:
        return np.empty(0, CAPTION_KEY)
    lists = None
    if captions == "caption and list":
        lists = (table.column("captions").to_pylist() if "captions" in table.column_names
                 else [None] * table.num_rows)
    return caption_keys(table.column("caption").to_pylist(), lists)


def reset_staging(staging: Path) -> None:
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
