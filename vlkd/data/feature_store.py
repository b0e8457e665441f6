"""Reading the features stage's Parquet as batches of tensors, refusing files made by another teacher."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vlkd.data.feature_schema import read_metadata
from vlkd.errors import VlkdError

EMBEDDINGS = ("image_embedding", "text_embedding")
# One file per shard, named after the shard's tar (00000.parquet for vlkd's shards, any name for others');
# partial files are hidden and end in .partial, summaries are JSON.
FEATURE_FILES = "*.parquet"


class FeatureStore:
    """The feature files of one folder, all made by one teacher (the expected one, if given)."""

    def __init__(self, folder: Path, expected_teacher: dict | None = None):
        self.files = sorted(folder.glob(FEATURE_FILES)) if folder.is_dir() else []
        if not self.files:
            raise VlkdError(f"no feature files in {folder}; run `vlkd features` first or check the path")
        self.metadata = self._common_metadata(expected_teacher)

    def _common_metadata(self, expected_teacher: dict | None) -> dict:
        first = None
        for path in self.files:
            metadata = read_metadata(path)
            if metadata is None:
                raise VlkdError(f"{path} is not a vlkd feature file (no vlkd.features metadata); remove it")
            teacher = metadata["teacher"]
            if expected_teacher is not None and teacher != expected_teacher:
                raise VlkdError(
                    f"{path} was made by teacher {teacher['model']} (weights {teacher['weights_sha256'][:12]}), "
                    f"not the expected {expected_teacher['model']} (weights "
                    f"{expected_teacher['weights_sha256'][:12]}); extract features with the right teacher")
            if first is None:
                first = metadata
            elif teacher != first["teacher"]:
                raise VlkdError(f"{path} and {self.files[0]} were made by different teachers; "
                                "re-extract the folder with one teacher")
        return first

    @property
    def teacher(self) -> dict:
        return self.metadata["teacher"]

    @property
    def embed_dim(self) -> int:
        return self.metadata["embed_dim"]

    @property
    def num_rows(self) -> int:
        return sum(pq.ParquetFile(path).metadata.num_rows for path in self.files)

    def iter_batches(self, batch_size: int, columns: Sequence[str] = EMBEDDINGS,
                     dtype: torch.dtype = torch.float32) -> Iterator[dict]:
        """Batches of `batch_size` rows (the last may be smaller) across files, in file and row order:
        {"key": [...], "caption": [...], column: tensor [n, ...]}. Memory: one batch."""
        missing = [c for c in columns if c not in pq.read_schema(self.files[0]).names]
        if missing:
            raise VlkdError(f"feature files in {self.files[0].parent} have no column(s) {missing}; "
                            "re-extract with the option that writes them (e.g. features.image_tokens)")
        wanted = ["key", "caption", *columns]
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for path in self.files:
            for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=wanted):
                pending.append(record_batch)
                pending_rows += record_batch.num_rows
                while pending_rows >= batch_size:
                    table = pa.Table.from_batches(pending)
                    yield table_to_batch(table.slice(0, batch_size), columns, dtype)
                    rest = table.slice(batch_size)
                    pending, pending_rows = rest.to_batches(), rest.num_rows
        if pending_rows:
            yield table_to_batch(pa.Table.from_batches(pending), columns, dtype)


def table_to_batch(table: pa.Table, columns: Sequence[str], dtype: torch.dtype = torch.float32) -> dict:
    batch = {"key": table.column("key").to_pylist(), "caption": table.column("caption").to_pylist()}
    for name in columns:
        if _is_text_list(table.schema.field(name).type):  # `captions`: stays Python lists of strings
            batch[name] = table.column(name).to_pylist()
            continue
        batch[name] = torch.from_numpy(fixed_size_to_numpy(table.column(name)).copy()).to(dtype)
    return batch


def _is_text_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) and pa.types.is_string(kind.value_type)


def fixed_size_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """Nested fixed-size lists of float16 as one [n, d1, d2, ...] array."""
    array = column.combine_chunks()
    shape = [len(array)]
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False).reshape(shape)
