"""Sorting a URL list's rows into usable, duplicate and invalid ones, batch by batch with Arrow compute.

img2dataset reads lists itself, but it neither reports which rows it could not use nor deduplicates, and the
accounting `successes + failures + duplicates + invalid = rows` needs both, so the rows are checked here and
only the usable, new ones are handed to img2dataset. Of the whole list, what is kept is a flag per row and a
few keys per usable row (keys.py); the usable rows themselves are read again when they are needed
(`CheckedRows.valid_batches`), so memory does not grow with the list's text. Invalid rows are kept whole
(they are reported row by row), which is little unless most of a list is invalid.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlkd.config import DownloadParams
from vlkd.corpus.keys import caption_keys, url_keys
from vlkd.corpus.url_list import UrlList
from vlkd.errors import VlkdError

# Rows read at a time: about 1 MB of a web list in Arrow, a few MB of Python strings while keys are computed.
# Measured on 2 cores, a 1M-row list: 4,096 peaked 60 MB below 16,384, in about the same seconds.
BATCH_ROWS = 4096

# What str.isspace() calls whitespace: Python's strip() and split() cleaned URLs and captions before, and the
# Arrow kernels below must clean them the same (tests/test_row_check.py holds this list to Python's).
WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
              "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_WHITESPACE_RUN = "[" + "".join(f"\\x{{{ord(char):x}}}" for char in WHITESPACE) + "]+"
# URLs that urlsplit surely parses as http(s) with a host, without raising: ASCII (no NFKC check of the host),
# no brackets (no IPv6 check), no tab or newline (urlsplit drops those, which changes what it parses). Any
# other URL goes through urlsplit itself, so the verdicts and reasons are urlsplit's.
_PLAIN_HTTP_URL = r"^[hH][tT][tT][pP][sS]?://[^/?#\[\]\t\r\n][^\[\]\t\r\n]*$"
INVALID_SCHEMA = pa.schema([("row", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
                            ("reason", pa.string())])


@dataclass
class CheckedRows:
    """A checked URL list. Usable rows: the first occurrence of each valid URL, in list order."""

    url_list: UrlList
    batch_size: int
    rows: int  # parsed rows plus lines that could not be parsed
    duplicates: int
    invalid: pa.Table  # row, url, caption, reason (INVALID_SCHEMA): malformed lines first, then rows in order
    caption_issues: dict[str, int]
    usable: np.ndarray  # bool per parsed row
    valid_keys: np.ndarray  # URL key per usable row
    caption_keys: np.ndarray  # per usable row, of its caption and, when the list has them, its caption list

    @property
    def valid_count(self) -> int:
        return len(self.valid_keys)

    @property
    def has_captions(self) -> bool:
        return self.url_list.has_captions

    def valid_batches(self) -> Iterator[pa.Table]:
        """The usable rows, read again and cleaned as they were checked: url, caption[, captions]."""
        for rows, _ in self.valid_rows_where(np.ones(self.valid_count, bool)):
            yield rows

    def valid_rows_where(self, wanted: np.ndarray) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """The usable rows where `wanted` (a flag per usable row), read again and cleaned as they were checked,
        batch by batch, with their numbers among the usable rows. Only those rows are cleaned, and the list is
        read only if some row is wanted."""
        if not wanted.any():
            return
        self.url_list.check_unchanged()
        read = before = 0  # rows read, usable rows before this batch
        for batch in self.url_list.batches(self.batch_size):
            if read + batch.num_rows > len(self.usable):
                self.url_list.check_unchanged(read + batch.num_rows, len(self.usable))
            usable = np.flatnonzero(self.usable[read:read + batch.num_rows])
            read += batch.num_rows
            picked = np.flatnonzero(wanted[before:before + len(usable)])
            if len(picked):
                keep = np.zeros(batch.num_rows, bool)
                keep[usable[picked]] = True
                yield _usable_columns(batch.filter(pa.array(keep)), self.url_list.params)[0], before + picked
            before += len(usable)
        self.url_list.check_unchanged(read, len(self.usable))


def check_rows(url_list: UrlList, params: DownloadParams, batch_size: int = BATCH_ROWS) -> CheckedRows:
    """Sort rows into usable, duplicate and invalid ones, and clean captions."""
    malformed: list[dict] = []
    invalid, valid, keys, captions, truncated, non_ascii = [], [], [], [], [], []
    start = 0
    for batch in url_list.batches(batch_size, malformed):
        checked = _check_batch(batch, start, params)
        start += batch.num_rows
        invalid.append(checked.invalid)
        valid.append(checked.valid_rows)
        keys.append(url_keys(checked.valid.column("url")))
        lists = checked.valid.column("captions").to_pylist() if url_list.has_captions else None
        captions.append(caption_keys(checked.valid.column("caption").to_pylist(), lists))
        truncated.append(checked.truncated)
        non_ascii.append(checked.non_ascii)
    if start == 0 and not malformed:
        raise VlkdError(f"URL list {url_list.path} has no rows; nothing to download")
    keys_of_valid = np.concatenate(keys) if keys else np.empty(0, "S16")
    # A URL's first row is the one used: np.unique's first index (its sort is stable for return_index).
    first = np.sort(np.unique(keys_of_valid, return_index=True)[1])
    usable = np.zeros(start, bool)
    usable[np.concatenate(valid)[first] if valid else []] = True
    lines = pa.table({"row": [None] * len(malformed), "url": [None] * len(malformed),
                      "caption": [None] * len(malformed),
                      "reason": [f"{bad['reason']} (line {bad['line']})" for bad in malformed]}, INVALID_SCHEMA)
    return CheckedRows(
        url_list=url_list,
        batch_size=batch_size,
        rows=start + len(malformed),
        duplicates=len(keys_of_valid) - len(first),
        invalid=pa.concat_tables([lines, *invalid]),
        caption_issues={"captions_truncated": int(_joined(truncated, np.int64)[first].sum()),
                        "captions_non_ascii": int(_joined(non_ascii, bool)[first].sum())},
        usable=usable,
        valid_keys=keys_of_valid[first],
        caption_keys=_joined(captions, np.dtype("S8"))[first],
    )


@dataclass
class _CheckedBatch:
    invalid: pa.Table
    valid_rows: np.ndarray  # the valid rows' numbers in the list
    valid: pa.Table  # url, caption[, captions], cleaned
    truncated: np.ndarray  # per valid row: how many of its captions were truncated
    non_ascii: np.ndarray  # per valid row: its caption is not ASCII


def _check_batch(batch: pa.RecordBatch, start: int, params: DownloadParams) -> _CheckedBatch:
    url = pc.utf8_trim(pc.fill_null(batch.column("url"), ""), characters=WHITESPACE)
    caption = _squeezed(batch.column("caption"))
    reason = _url_problems(url)
    reason = pc.if_else(pc.and_(pc.is_null(reason), pc.equal(caption, "")), "empty or missing caption", reason)
    bad = pc.is_valid(reason)
    invalid = pa.table({"row": pc.add(pc.indices_nonzero(bad), start), "url": url.filter(bad),
                        "caption": caption.filter(bad), "reason": reason.filter(bad)}, INVALID_SCHEMA)
    good = pc.invert(bad)
    valid, truncated = _usable_columns(batch.filter(good), params)
    return _CheckedBatch(
        invalid=invalid,
        valid_rows=np.flatnonzero(good.to_numpy(zero_copy_only=False)) + start,
        valid=valid,
        truncated=truncated,
        non_ascii=pc.invert(pc.string_is_ascii(valid.column("caption"))).to_numpy(zero_copy_only=False),
    )


def _usable_columns(batch: pa.RecordBatch, params: DownloadParams) -> tuple[pa.Table, np.ndarray]:
    """Valid rows cleaned for img2dataset, and how many captions of each row were truncated."""
    url = pc.utf8_trim(batch.column("url"), characters=WHITESPACE)
    caption = _squeezed(batch.column("caption"))
    truncated = pc.greater(pc.utf8_length(caption), params.max_caption_chars).to_numpy(zero_copy_only=False)
    caption = pc.utf8_slice_codeunits(caption, 0, params.max_caption_chars)  # code points, despite the name
    columns = {"url": url, "caption": caption}
    truncated = truncated.astype(np.int64)
    if "captions" in batch.schema.names:
        columns["captions"], truncated_extras = _caption_lists(caption, batch.column("captions"),
                                                               params.max_caption_chars)
        truncated += truncated_extras
    schema = pa.schema([(name, column.type) for name, column in columns.items()])
    return pa.table(columns, schema=schema), truncated


def _caption_lists(main: pa.Array, lists: pa.Array, max_chars: int) -> tuple[pa.Array, np.ndarray]:
    """Each row's every caption, its main one first, the others cleaned and truncated as the main one, empty
    ones and repeats dropped (the first kept); and per row, how many of the others were truncated."""
    rows = len(main)
    extra = _squeezed(pc.list_flatten(lists))  # a null list has no captions, a null caption is empty
    parent = pc.list_parent_indices(lists).to_numpy()
    too_long = pc.greater(pc.utf8_length(extra), max_chars).to_numpy(zero_copy_only=False)
    truncated = np.bincount(parent, weights=too_long, minlength=rows).astype(np.int64)
    extra = pc.utf8_slice_codeunits(extra, 0, max_chars)
    # Candidates (row, position, text): the main caption at position -1, then the others in list order.
    position = np.arange(len(parent)) - np.searchsorted(parent, parent)  # `parent` ascends
    candidates = pa.table({"row": np.concatenate([np.arange(rows), parent]),
                           "position": np.concatenate([np.full(rows, -1), position]),
                           "text": pa.concat_arrays([main, extra])})
    candidates = candidates.filter(pc.not_equal(candidates.column("text"), ""))
    firsts = candidates.group_by(["row", "text"]).aggregate([("position", "min")])
    firsts = firsts.sort_by([("row", "ascending"), ("position_min", "ascending")])
    offsets = np.concatenate([[0], np.cumsum(np.bincount(firsts.column("row").to_numpy(), minlength=rows))])
    texts = firsts.column("text").combine_chunks()
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), texts), truncated


def _squeezed(captions: pa.Array) -> pa.Array:
    """Python's `" ".join((caption or "").split())` in Arrow: whitespace runs to one space, none at the ends
    (newlines and tabs would break .txt and tsv), a missing caption empty."""
    trimmed = pc.utf8_trim(pc.fill_null(captions, ""), characters=WHITESPACE)
    return pc.replace_substring_regex(trimmed, pattern=_WHITESPACE_RUN, replacement=" ")


def _url_problems(urls: pa.Array) -> pa.Array:
    """Per URL (stripped), why it cannot be downloaded, or null."""
    plain = pc.and_(pc.string_is_ascii(urls), pc.match_substring_regex(urls, _PLAIN_HTTP_URL))
    others = np.flatnonzero(pc.invert(plain).to_numpy(zero_copy_only=False))
    reasons: list[str | None] = [None] * len(urls)
    for row, url in zip(others, urls.take(others).to_pylist(), strict=True):
        reasons[row] = _url_problem(url)
    return pa.array(reasons, pa.string())


def _url_problem(url: str) -> str | None:
    if not url:
        return "empty or missing url"
    try:
        parts = urlsplit(url)
    except ValueError as err:
        return f"malformed url ({err})"
    if parts.scheme not in ("http", "https"):
        return f"not an http(s) url (scheme {parts.scheme!r})" if parts.scheme else "not an http(s) url"
    if not parts.netloc:
        return "url has no host"
    return None


def _joined(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype)
