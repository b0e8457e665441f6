"""The feature files' contract: Arrow schema and the file-level metadata that names the teacher.

One Parquet file per shard, `NNNNN.parquet`, rows in the shard's order:
  key              string                               the shard's sample key (joins back to the tar)
  caption          string                               the caption the text embedding is of
  captions         list<string>                         every caption of the image, `caption` first
  image_embedding  fixed_size_list<float16>[embed_dim]   L2-normalised
  text_embedding   fixed_size_list<float16>[embed_dim]   L2-normalised
  image_tokens     fixed_size_list<fixed_size_list<float16>[width]>[tokens]   optional: final-layer
                   patch tokens (after ln_post, before the projection)
File metadata key `vlkd.features`: JSON with format, teacher fingerprint, preprocessing, embedding size,
dtype, token shape and the source shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = 1
METADATA_KEY = b"vlkd.features"
BAD_SAMPLES_KEY = b"vlkd.bad_samples"  # file-level: [[key, reason], ...] of the shard's undecodable samples
DTYPE = "float16"


def feature_schema(embed_dim: int, token_shape: tuple[int, int] | None, metadata: dict) -> pa.Schema:
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("captions", pa.list_(pa.string())),
        pa.field("image_embedding", pa.list_(pa.float16(), embed_dim), nullable=False),
        pa.field("text_embedding", pa.list_(pa.float16(), embed_dim), nullable=False),
    ]
    if token_shape is not None:
        tokens, width = token_shape
        fields.append(pa.field("image_tokens", pa.list_(pa.list_(pa.float16(), width), tokens), nullable=False))
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def fixed_size_array(values: np.ndarray) -> pa.Array:
    """A [n, d1, d2, ...] array as nested Arrow fixed-size lists of float16."""
    array: pa.Array = pa.array(np.ascontiguousarray(values, dtype=np.float16).reshape(-1))
    for size in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def read_metadata(path: Path) -> dict | None:
    """The file's vlkd metadata, or None if it has none (not a feature file)."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(METADATA_KEY)
    return json.loads(raw) if raw else None


def read_bad_samples(path: Path) -> list[tuple[str, str]]:
    """The (key, reason) of every sample of the shard that the features file has no row for."""
    raw = (pq.read_metadata(path).metadata or {}).get(BAD_SAMPLES_KEY)
    return [tuple(pair) for pair in json.loads(raw)] if raw else []
