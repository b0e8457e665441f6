"""Reading a URL list (parquet, csv, tsv) and sorting its rows into valid, duplicate and invalid.

img2dataset reads lists itself, but it neither reports which rows it could not use nor deduplicates,
and the accounting `successes + failures + duplicates + invalid = rows` needs both, so the rows are
checked here and only the valid, new ones are handed to img2dataset.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from vlkd.config import DownloadParams
from vlkd.errors import VlkdError

log = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv"}


@dataclass
class CheckedRows:
    """The rows of a URL list after checking, in input order."""

    rows: int  # parsed rows plus lines that could not be parsed
    valid: pa.Table  # url, caption[, captions]: first occurrence of each usable URL
    invalid: pa.Table  # row, url, caption, reason
    duplicates: int
    caption_issues: dict[str, int] = field(default_factory=dict)


@dataclass
class UrlList:
    table: pa.Table  # url, caption (strings, may be null)[, captions (lists of strings)]
    malformed: list[dict]  # csv/tsv lines that could not be parsed: line, text, reason


def read_url_list(path: Path, params: DownloadParams) -> UrlList:
    """The list's url and caption columns as strings, renamed to `url` and `caption`, and with
    `captions_col` set, that column as lists of strings, renamed to `captions`."""
    if not path.is_file():
        raise VlkdError(f"URL list {path} does not exist; check --url-list (or download.url_list)")
    fmt = _format_of(path, params.input_format)
    try:
        table, malformed = _read_table(path, fmt, params.column_names)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:
        reason = str(err).splitlines()[0]
        raise VlkdError(
            f"cannot read URL list {path} as {fmt} ({reason}); check the file and --input-format"
        ) from err
    for option, column in (("--url-col", params.url_col), ("--caption-col", params.caption_col)):
        if column not in table.column_names:
            hint = "" if params.column_names else " (a file without a header needs --column-names)"
            raise VlkdError(
                f"URL list {path} has no column {column!r} (it has {table.column_names}); "
                f"set {option}{hint}"
            )
    if table.num_rows == 0 and not malformed:
        raise VlkdError(f"URL list {path} has no rows; nothing to download")
    columns = {"url": _as_strings(table.column(params.url_col)),
               "caption": _as_strings(table.column(params.caption_col))}
    if params.captions_col and params.captions_col not in table.column_names:
        log.warning("URL list %s has no column %r (download.captions_col): one caption per image", path,
                    params.captions_col)
    elif params.captions_col:
        columns["captions"] = _as_string_lists(table.column(params.captions_col), path, params.captions_col)
    return UrlList(pa.table(columns), malformed)


def _format_of(path: Path, requested: str) -> str:
    if requested != "auto":
        return requested
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise VlkdError(
            f"cannot tell the format of {path} from its extension; set --input-format parquet|csv|tsv"
        )
    return fmt


def _read_table(path: Path, fmt: str, column_names: list[str] | None) -> tuple[pa.Table, list[dict]]:
    """The table, and the lines that could not be parsed (recorded as invalid rows, never fatal)."""
    if fmt == "parquet":
        return pq.read_table(path), []
    delimiter = "\t" if fmt == "tsv" else ","
    names = column_names or _header(path, delimiter)
    malformed: list[dict] = []

    def skip_malformed(row: pacsv.InvalidRow) -> str:
        malformed.append({"line": row.number, "text": row.text,
                          "reason": f"malformed line: expected {row.expected_columns} fields, "
                                    f"got {row.actual_columns}"})
        return "skip"

    table = pacsv.read_csv(
        path,
        # Single-threaded so that a malformed line is reported with its line number.
        read_options=pacsv.ReadOptions(column_names=column_names, use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=skip_malformed),
        # Everything as text: a caption "2" or a numeric-looking id must stay a string.
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string())),
    )
    return table, malformed


def _header(path: Path, delimiter: str) -> list[str]:
    with path.open(newline="", encoding="utf-8") as file:
        return next(csv.reader(file, delimiter=delimiter), [])


def _as_strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return column if pa.types.is_string(column.type) else column.cast(pa.string())


def _as_string_lists(column: pa.ChunkedArray, path: Path, name: str) -> pa.ChunkedArray:
    """A list column as lists of strings; a string column (csv, tsv) as one-caption lists."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        if not pa.types.is_string(column.type.value_type):
            return column.cast(pa.list_(pa.string()))
        return column
    if pa.types.is_string(column.type):
        return pa.chunked_array([[[value] if value is not None else None for value in column.to_pylist()]],
                                pa.list_(pa.string()))
    raise VlkdError(f"column {name!r} of URL list {path} is {column.type}, not a list of captions; "
                    "point --captions-col at a list<string> column or leave it unset")


def _squeeze(caption: str | None) -> str:
    return " ".join((caption or "").split())  # newlines and tabs would break .txt and tsv


def _truncate(caption: str, params: DownloadParams, issues: dict[str, int]) -> str:
    if len(caption) > params.max_caption_chars:
        caption = caption[: params.max_caption_chars]
        issues["captions_truncated"] += 1
    return caption


def check_rows(url_list: UrlList, params: DownloadParams) -> CheckedRows:
    """Sort rows into usable, duplicate and invalid ones, and clean captions."""
    table = url_list.table
    seen: set[str] = set()
    valid_urls, valid_captions, valid_lists = [], [], []
    lists = (table.column("captions").to_pylist() if "captions" in table.column_names
             else [None] * table.num_rows)
    invalid = [{"row": None, "url": None, "caption": None, "reason": f"{bad['reason']} (line {bad['line']})"}
               for bad in url_list.malformed]
    duplicates = 0
    issues = {"captions_truncated": 0, "captions_non_ascii": 0}
    for row, (url, caption, others) in enumerate(zip(table.column("url").to_pylist(),
                                                    table.column("caption").to_pylist(), lists, strict=True)):
        url = (url or "").strip()
        reason = _url_problem(url)
        caption = _squeeze(caption)
        if reason is None and not caption:
            reason = "empty or missing caption"
        if reason is not None:
            invalid.append({"row": row, "url": url, "caption": caption, "reason": reason})
            continue
        if url in seen:
            duplicates += 1
            continue
        seen.add(url)
        caption = _truncate(caption, params, issues)
        if not caption.isascii():
            issues["captions_non_ascii"] += 1
        valid_urls.append(url)
        valid_captions.append(caption)
        # The sample's every caption, its main one first; empty ones are dropped.
        extra = [_truncate(_squeeze(text), params, issues) for text in others or []]
        valid_lists.append(list(dict.fromkeys([caption, *filter(None, extra)])))
    invalid_schema = pa.schema([("row", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
                                ("reason", pa.string())])
    valid = pa.table({"url": valid_urls, "caption": valid_captions},
                     schema=pa.schema([("url", pa.string()), ("caption", pa.string())]))
    if "captions" in table.column_names:
        valid = valid.append_column("captions", pa.array(valid_lists, pa.list_(pa.string())))
    return CheckedRows(
        rows=table.num_rows + len(url_list.malformed),
        valid=valid,
        invalid=pa.Table.from_pylist(invalid, schema=invalid_schema),
        duplicates=duplicates,
        caption_issues=issues,
    )


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
