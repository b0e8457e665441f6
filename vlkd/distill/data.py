"""Training batches from the feature store: shuffled per epoch, split across ranks, resumable.

Why not a DataLoader over all rows: a Parquet row has no cheap random access, and a corpus can be larger
than memory. So an epoch visits the files in a seeded order, a window of `window_files` files at a time,
shuffles the rows inside the window, and deals the resulting stream out to ranks (row n → rank n % world).
Memory: one window. Every rank gets the same number of batches (`steps_per_epoch`), so DDP never waits
on a rank that ran out, and the order depends only on (seed, epoch): a resumed run skips the batches it
has done and sees exactly the batches an uninterrupted run would. A continuation trains on a selection of
rows (distill/rows.py): the same, over the selected rows only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlkd.data.feature_store import FeatureStore, table_to_batch
from vlkd.errors import VlkdError


class FeatureBatches:
    """`rows`: the row indices to train on per feature file name (a file not named: none of its rows);
    None: every row of every file."""

    def __init__(self, store: FeatureStore, columns: Sequence[str], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, window_files: int = 8,
                 rows: Mapping[str, np.ndarray] | None = None):
        self.store, self.columns, self.batch_size = store, list(columns), batch_size
        self.seed, self.rank, self.world_size, self.window_files = seed, rank, world_size, window_files
        self.files = store.files if rows is None else [path for path in store.files if path.name in rows]
        self.selected = rows
        self.rows = store.num_rows if rows is None else sum(len(rows[path.name]) for path in self.files)
        self.steps_per_epoch = self.rows // world_size // batch_size
        if self.steps_per_epoch == 0:
            chosen = "" if rows is None else " to train on (kept by the filter, and unseen or replayed)"
            raise VlkdError(f"{self.rows} feature rows{chosen} in {store.files[0].parent} make no batch of "
                            f"{batch_size} per rank on {world_size} rank(s); lower distill.batch_size or add data")

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        """This rank's batches of `epoch`, from batch `skip` on."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.files))
        pending: list[pa.Table] = []
        pending_rows, position, produced = 0, 0, 0
        for start in range(0, len(order), self.window_files):
            window = pa.concat_tables([self._read(self.files[i]) for i in order[start:start + self.window_files]])
            shuffled = rng.permutation(window.num_rows)
            mine = shuffled[(self.rank - position) % self.world_size::self.world_size]
            position += window.num_rows
            pending.append(window.take(mine))
            pending_rows += len(mine)
            while pending_rows >= self.batch_size and produced < self.steps_per_epoch:
                table = pa.concat_tables(pending)
                if produced >= skip:
                    yield table_to_batch(table.slice(0, self.batch_size), self.columns)
                produced += 1
                rest = table.slice(self.batch_size)
                pending, pending_rows = [rest], rest.num_rows
            if produced >= self.steps_per_epoch:
                return

    def _read(self, path) -> pa.Table:
        table = pq.read_table(path, columns=["key", "caption", *self.columns])
        return table if self.selected is None else table.take(self.selected[path.name])
