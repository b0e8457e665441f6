"""img2dataset's webdataset writer, made reproducible: the same rows give the same shard bytes.

img2dataset's own `WebDatasetSampleWriter` writes samples in the order its download threads finish and
stamps every tar member with the wall-clock time, so the same URL list downloaded twice gives different
tars (and DVC sees a new corpus). This writer takes its place through `Downloader(sample_writer_class=...)`,
so it runs inside whichever worker wrote the shard, under every distributor: samples are spilled to a
side file as they arrive, and on close the tar is written in key order with fixed member metadata, and
the parquet with one row per attempted URL in key order. Memory stays bounded by the shard's metadata
rows (the images stay on disk).
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlkd.data.webdataset import add_member


class KeyOrderedWebDatasetWriter:
    """Drop-in for `img2dataset.writer.WebDatasetSampleWriter` (same constructor and methods)."""

    def __init__(self, shard_id: int, output_folder: str, save_caption: bool, oom_shard_count: int,
                 schema: pa.Schema, encode_format: str) -> None:
        name = f"{shard_id:0{oom_shard_count}d}"
        self.tar_path = Path(output_folder) / f"{name}.tar"
        self.parquet_path = Path(output_folder) / f"{name}.parquet"
        self.spill_path = Path(output_folder) / f".{name}.unordered"
        self.spill = self.spill_path.open("wb")
        self.save_caption = save_caption
        self.schema = schema
        self.encode_format = encode_format
        self.members: dict[str, list[tuple[str, int, int]]] = {}  # key -> [(extension, offset, size)]
        self.rows: list[dict] = []

    def write(self, img_str: bytes | None, key: str, caption: str | None, meta: dict) -> None:
        meta = {name: value.tolist() if isinstance(value, np.ndarray) else value for name, value in meta.items()}
        if img_str is not None:
            sample = {self.encode_format: img_str, "json": json.dumps(meta, indent=4).encode()}
            if self.save_caption:
                sample["txt"] = (str(caption) if caption is not None else "").encode()
            self.members[key] = [(extension, *self._spill(data)) for extension, data in sorted(sample.items())]
        self.rows.append(meta)

    def _spill(self, data: bytes) -> tuple[int, int]:
        offset = self.spill.tell()
        self.spill.write(data)
        return offset, len(data)

    def close(self) -> None:
        self.spill.close()
        with self.spill_path.open("rb") as spill, tarfile.open(self.tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key in sorted(self.members):
                for extension, offset, size in self.members[key]:
                    spill.seek(offset)
                    add_member(tar, f"{key}.{extension}", spill.read(size))
        os.unlink(self.spill_path)
        rows = sorted(self.rows, key=lambda row: row["key"])
        pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), self.parquet_path)


