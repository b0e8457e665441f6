"""Accounting for every row of a URL list after a download: summary.json and failed.parquet.

`successes + failures + duplicates + invalid = rows`, where a row's outcome is its URL's latest attempt in
the shards' ledger. The outcomes are codes in a numpy array, one per usable row, and the rows' text is read
again only to write the failed ones (see row_check.py).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from vlkd.corpus import shards
from vlkd.corpus.parquet_stream import ParquetStream
from vlkd.corpus.row_check import CheckedRows
from vlkd.io import tmp_path_for

SUMMARY = "summary.json"
FAILED = "failed.parquet"
NOT_RECORDED = "not recorded by img2dataset (its shard failed); run again to retry"


@dataclass(frozen=True)
class Outcomes:
    """What became of each usable row, by the shards' ledger."""

    codes: np.ndarray  # per usable row: shards.SUCCESS, or the index of its failure's reason in `reasons`
    reasons: list[str]


def outcomes_of(checked: CheckedRows, ledger: shards.Ledger) -> Outcomes:
    reasons = ledger.reasons if NOT_RECORDED in ledger.reasons else [*ledger.reasons, NOT_RECORDED]
    at = ledger.find(checked.valid_keys)
    codes = np.full(len(at), reasons.index(NOT_RECORDED), np.int32)
    held = at >= 0
    codes[held] = ledger.outcomes[at[held]]
    return Outcomes(codes, reasons)


def summarize(checked: CheckedRows, outcomes: Outcomes, output: Path) -> dict:
    """Account for every row of the list, and roll up every shard of the folder."""
    failed = outcomes.codes[outcomes.codes != shards.SUCCESS]
    failures = {outcomes.reasons[code]: count for code, count in _most_common(failed)}
    invalid = Counter(checked.invalid.column("reason").to_pylist())
    stats = [json.loads((output / f"{i:05d}{shards.STATS_SUFFIX}").read_text())
             for i in shards.complete_shards(output)]
    summary = {
        "url_list": {
            "rows": checked.rows,
            "successes": len(outcomes.codes) - len(failed),
            "failures": len(failed),
            "duplicates": checked.duplicates,
            "invalid": sum(invalid.values()),
            "failures_by_reason": failures,
            "invalid_by_reason": dict(invalid.most_common()),
            **checked.caption_issues,
        },
        "shards": {
            "count": len(stats),
            "samples": sum(s["successes"] for s in stats),
            "attempts": sum(s["count"] for s in stats),
        },
    }
    url_list = summary["url_list"]
    accounted = url_list["successes"] + url_list["failures"] + url_list["duplicates"] + url_list["invalid"]
    assert accounted == checked.rows, f"row accounting is off: {accounted} != {checked.rows}"
    return summary


def _most_common(codes: np.ndarray) -> list[tuple[int, int]]:
    """(code, count), most frequent first, ties in the order first seen: Counter(codes).most_common()."""
    values, first, counts = np.unique(codes, return_index=True, return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-counts[i], first[i]))
    return [(int(values[i]), int(counts[i])) for i in order]


def write_failed(checked: CheckedRows, outcomes: Outcomes, path: Path) -> None:
    """Every row of the list that yielded no sample, with its reason: failed downloads and invalid rows."""
    schema = pa.schema([(name, pa.string()) for name in ("url", "caption", "reason", "kind")])
    reasons = pa.array(outcomes.reasons, pa.string())
    failing = outcomes.codes != shards.SUCCESS
    tmp = tmp_path_for(path)
    try:
        with ParquetStream(tmp, schema) as failed:
            for rows, numbers in checked.valid_rows_where(failing):
                codes = outcomes.codes[numbers]
                failed.write(pa.table({"url": rows.column("url"), "caption": rows.column("caption"),
                                       "reason": reasons.take(codes), "kind": pa.repeat("download", len(codes))}))
            invalid = checked.invalid
            failed.write(pa.table({"url": invalid.column("url"), "caption": invalid.column("caption"),
                                   "reason": invalid.column("reason"),
                                   "kind": pa.repeat("invalid", invalid.num_rows)}))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
