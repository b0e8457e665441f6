"""Fixed-size keys for URLs and captions, so that the download's bookkeeping holds a few bytes a row in numpy
arrays instead of Python strings in lists, sets and dicts (about 2.3 KB a row of the list, measured).

URL keys are 128-bit: two different URLs of a list share a key with probability about n² / 2¹²⁹ (1e-22 for
LAION-400M's 400M rows), where 64 bits would collide once in about 200 such lists and silently count a URL as
a duplicate. Caption keys are only ever compared in pairs (a row's captions against the ones its URL was
stored with), so 64 bits leave a 2⁻⁶⁴ chance per pair of missing a change.
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b

import numpy as np
import pyarrow as pa

URL_KEY = np.dtype("S16")  # numpy compares and sorts these as 16 raw bytes (embedded NULs included)
CAPTION_KEY = np.dtype("S8")


def url_keys(urls: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return _digests((url or "" for url in urls.to_pylist()), URL_KEY)


def caption_keys(captions: Iterable[str | None], caption_lists: Iterable[list | None] | None = None) -> np.ndarray:
    """A key per row of its caption, or with `caption_lists`, of its caption and caption list together (a null
    list, from shards written without one, has a key of its own). repr() writes strings, lists and None
    unambiguously, and faster than json; keys are compared within one process only, never stored."""
    rows = captions if caption_lists is None else zip(captions, caption_lists, strict=True)
    return _digests(map(repr, rows), CAPTION_KEY)


def _digests(texts: Iterable[str], dtype: np.dtype) -> np.ndarray:
    digest = b"".join(blake2b(text.encode("utf-8"), digest_size=dtype.itemsize).digest() for text in texts)
    return np.frombuffer(digest, dtype=dtype) if digest else np.empty(0, dtype)


def find(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The index of each key in `sorted_keys` (sorted, without repeats), or -1 where it is not there."""
    if not len(sorted_keys):
        return np.full(len(keys), -1, np.int64)
    at = np.searchsorted(sorted_keys, keys)
    at_or_last = np.minimum(at, len(sorted_keys) - 1)
    return np.where(sorted_keys[at_or_last] == keys, at_or_last, -1)
