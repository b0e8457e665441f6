"""Which feature rows a distillation run trains on: all of them, or, continuing from a student
(`distill.init`), the rows that student has not seen plus a replayed sample of those it has.

With the filter stage (distill.kept), only the rows it kept are available; the rest never train. A
student folder records the rows it has learnt from (`ROWS_SEEN`: feature file name -> rows), so a
refresh that added shards costs in proportion to what it added: the new rows, and `distill.replay` old
rows per new one so that the student does not drift towards the new rows alone. Feature files only ever
grow (a download appends shards; a shard's rows keep their order), so "unseen" is "past the count
recorded for the file".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlkd.errors import VlkdError

ROWS_SEEN = "feature-rows.json"


@dataclass(frozen=True)
class RowSelection:
    """Row indices per feature file name (files absent: none of their rows), and how they were chosen."""

    rows: dict[str, np.ndarray]
    new: int
    replayed: int

    @property
    def total(self) -> int:
        return self.new + self.replayed


def read_rows_seen(student: Path) -> dict[str, int] | None:
    """The rows a student folder has learnt from, or None when it does not say (a student from before
    this record, or from elsewhere)."""
    path = Path(student) / ROWS_SEEN
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return {str(name): int(rows) for name, rows in record["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise VlkdError(f"{path} is not a record of feature rows ({err}); remove it to train on every row") from err


def rows_seen_record(file_rows: dict[str, int], seen_before: dict[str, int] | None) -> dict:
    """What a student trained on `file_rows` (name -> rows in the store) has seen: every row of them (the
    old ones through its init), and whatever its init had seen in files this store no longer holds."""
    files = dict(seen_before or {})
    files.update(file_rows)
    return {"files": dict(sorted(files.items()))}


def continuation_rows(available: dict[str, np.ndarray], seen: dict[str, int], replay: float,
                      seed: int) -> RowSelection:
    """Of the `available` rows of each file (sorted indices: every row, or the rows the filter kept), those
    past the ones `seen`, and round(replay x new) of the seen ones drawn uniformly (without replacement,
    seeded) across files."""
    old = {name: rows[rows < seen.get(name, 0)] for name, rows in available.items()}
    new = {name: rows[rows >= seen.get(name, 0)] for name, rows in available.items()}
    new_count = sum(len(indices) for indices in new.values())
    old_count = sum(len(indices) for indices in old.values())
    replayed = min(round(replay * new_count), old_count)
    picks = np.sort(np.random.default_rng([seed, new_count]).choice(old_count, size=replayed, replace=False))
    rows, offset = {}, 0
    for name in sorted(available):
        size = len(old[name])
        mine = old[name][picks[(picks >= offset) & (picks < offset + size)] - offset]
        offset += size
        chosen = np.concatenate([mine, new[name]]).astype(np.int64)
        if len(chosen):
            rows[name] = chosen
    return RowSelection(rows, new_count, replayed)


def every_row(available: dict[str, np.ndarray]) -> RowSelection:
    """A fresh student's rows: all the available ones."""
    return RowSelection({name: rows for name, rows in available.items() if len(rows)},
                        sum(len(rows) for rows in available.values()), 0)
