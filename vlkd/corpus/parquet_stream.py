"""Writing a Parquet file whose rows arrive in pieces, with the bytes `pq.write_table` gives the whole table.

`pq.write_table` cuts a table into row groups of pyarrow's default length, whatever its chunks; a
`ParquetWriter` makes a row group of every call. Collecting pieces into row groups of that length, and only
then writing them, gives the same file while holding at most one row group in memory.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 1024 * 1024  # pq.write_table's row group length (pyarrow's _DEFAULT_ROW_GROUP_SIZE)


class ParquetStream:
    """`with ParquetStream(path, schema) as out: out.write(piece)...`; the file is complete when the block ends."""

    def __init__(self, path: Path, schema: pa.Schema, row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.schema = schema
        self.row_group_rows = row_group_rows
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer = pq.ParquetWriter(path, schema)

    def write(self, piece: pa.Table) -> None:
        if not piece.num_rows:
            return
        self._pending.append(piece.cast(self.schema))
        self._pending_rows += piece.num_rows
        if self._pending_rows >= self.row_group_rows:
            pending = pa.concat_tables(self._pending)
            full = pending.num_rows - pending.num_rows % self.row_group_rows
            for start in range(0, full, self.row_group_rows):
                self._write_group(pending.slice(start, self.row_group_rows))
            self._pending = [pending.slice(full)] if full < pending.num_rows else []
            self._pending_rows = pending.num_rows - full

    def close(self) -> None:
        # pq.write_table of an empty table writes one empty row group: so does an empty stream.
        if self._pending_rows or not self.rows:
            self._write_group(pa.concat_tables(self._pending) if self._pending else self.schema.empty_table())
        self._pending = []
        self._writer.close()

    def _write_group(self, table: pa.Table) -> None:
        self._writer.write_table(table, row_group_size=self.row_group_rows)
        self.rows += table.num_rows

    def __enter__(self) -> ParquetStream:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if error is None:
            self.close()
        else:
            self._writer.close()
