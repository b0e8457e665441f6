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

import pyarrow as pa
import pyarrow.parquet as pq

from vlkd.data.webdataset import STATS_SUFFIX
from vlkd.io import write_json_atomic

log = logging.getLogger(__name__)

SHARD_FILE = re.compile(r"^(\d{5,})(\.tar|\.parquet|_stats\.json)$")
# What img2dataset's stats file says about the run rather than the shard (wall-clock times).
RUN_FIELDS = ("start_time", "end_time", "duration")
SHARD_SUFFIXES = (".tar", ".parquet", STATS_SUFFIX)  # the order in which a shard is moved into place


@dataclass(frozen=True)
class Ledger:
    """Every URL the shards hold, with the status of its latest attempt."""

    table: pa.Table  # url, caption, key, status, error_message, shard[, captions] (one row per URL: the latest)

    def outcomes(self) -> dict[str, str | None]:
        """URL -> None for a success, else the failure's reason (img2dataset's error, or its status)."""
        return {
            url: None if status == "success" else failure_reason(error or status)
            for url, status, error in zip(*(self.table.column(c).to_pylist()
                                            for c in ("url", "status", "error_message")), strict=True)
        }


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


def read_ledger(output: Path) -> Ledger:
    """The latest status of each URL over all complete shards (a retried URL's later shard wins), with the
    captions it was stored with (`captions` null for shards written without download.captions_col)."""
    columns = ["url", "caption", "key", "status", "error_message"]
    tables = []
    for shard_id in complete_shards(output):
        path = output / f"{shard_id:05d}.parquet"
        listed = ["captions"] if "captions" in pq.read_schema(path).names else []
        table = pq.read_table(path, columns=columns + listed)
        tables.append(table.append_column("shard", pa.array([shard_id] * table.num_rows, pa.int64())))
    if not tables:
        schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                            ("status", pa.string()), ("error_message", pa.string()), ("shard", pa.int64())])
        return Ledger(schema.empty_table())
    every_attempt = pa.concat_tables(tables, promote_options="permissive")
    # Sort so the latest attempt of a URL comes first, then keep the first row per URL.
    ordered = every_attempt.sort_by([("url", "ascending"), ("shard", "descending")])
    urls = ordered.column("url").to_pylist()
    first = [i for i, url in enumerate(urls) if i == 0 or url != urls[i - 1]]
    return Ledger(ordered.take(first))


def reset_staging(staging: Path) -> None:
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
