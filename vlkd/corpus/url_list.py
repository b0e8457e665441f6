"""Reading a URL list (parquet, csv, tsv) in record batches of its url, caption[, captions] columns.

The list is read in batches rather than whole so that the download's memory does not grow with it (CC3M has
3.3M rows, LAION-400M 400M); the download reads it more than once (checking, planning, accounting), which
costs less than holding it. Lines of a csv/tsv that cannot be parsed are reported, never fatal.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from vlkd.config import DownloadParams
from vlkd.errors import VlkdError

log = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".txt": "tsv"}
READ_BUFFER_BYTES = 1 << 20


@dataclass(frozen=True)
class UrlList:
    """A URL list whose columns were found; `batches` reads it."""

    path: Path
    params: DownloadParams
    fmt: str
    has_captions: bool  # the list has the `captions_col` column
    stamp: tuple[int, int]  # size and mtime when opened: a list that changes between reads is an error

    def batches(self, batch_size: int, malformed: list[dict] | None = None) -> Iterator[pa.RecordBatch]:
        """Batches of at most `batch_size` rows: url and caption as strings, with `has_captions` captions as
        lists of strings. csv/tsv lines that cannot be parsed are skipped and, with `malformed`, appended to
        it (line, text, reason)."""
        try:
            for batch in self._read(batch_size, malformed):
                for start in range(0, batch.num_rows, batch_size):
                    yield self._columns(batch.slice(start, batch_size))
        except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:
            raise _unreadable(self.path, self.fmt, err) from err

    def check_unchanged(self, rows_read: int | None = None, rows: int | None = None) -> None:
        """Stop with one clear line if the file is not the one opened, or a read gave another row count."""
        if _stamp(self.path) != self.stamp or rows_read != rows:
            raise VlkdError(f"URL list {self.path} changed while the download was reading it; run the download "
                            "again once the list is written")

    def _read(self, batch_size: int, malformed: list[dict] | None) -> Iterator[pa.RecordBatch]:
        names = self._wanted_columns()
        if self.fmt == "parquet":
            # Buffered reads: by default a row group's column chunks are loaded whole before decoding, and
            # pq.write_table's row groups hold up to 1Mi rows (about 250 MB of a web list's text).
            source = pq.ParquetFile(self.path, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
            yield from source.iter_batches(batch_size=batch_size, columns=names)
            return

        def skip_malformed(row: pacsv.InvalidRow) -> str:
            if malformed is not None:
                malformed.append({"line": row.number, "text": row.text,
                                  "reason": f"malformed line: expected {row.expected_columns} fields, "
                                            f"got {row.actual_columns}"})
            return "skip"

        with _open_csv(self.path, self.fmt, self.params.column_names, skip_malformed) as reader:
            for batch in reader:
                yield batch.select(names)

    def _wanted_columns(self) -> list[str]:
        names = [self.params.url_col, self.params.caption_col]
        return list(dict.fromkeys(names + ([self.params.captions_col] if self.has_captions else [])))

    def _columns(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        columns = {"url": _as_strings(batch.column(self.params.url_col)),
                   "caption": _as_strings(batch.column(self.params.caption_col))}
        if self.has_captions:
            columns["captions"] = _as_string_lists(batch.column(self.params.captions_col))
        return pa.RecordBatch.from_pydict(columns)


def open_url_list(path: Path, params: DownloadParams) -> UrlList:
    """The list, after checking that it can be read and has the columns `params` names."""
    if not path.is_file():
        raise VlkdError(f"URL list {path} does not exist; check --url-list (or download.url_list)")
    fmt = _format_of(path, params.input_format)
    try:
        schema = _schema(path, fmt, params.column_names)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:
        raise _unreadable(path, fmt, err) from err
    for option, column in (("--url-col", params.url_col), ("--caption-col", params.caption_col)):
        if column not in schema.names:
            hint = "" if params.column_names else " (a file without a header needs --column-names)"
            raise VlkdError(
                f"URL list {path} has no column {column!r} (it has {schema.names}); set {option}{hint}"
            )
    has_captions = bool(params.captions_col) and params.captions_col in schema.names
    if params.captions_col and not has_captions:
        log.warning("URL list %s has no column %r (download.captions_col): one caption per image", path,
                    params.captions_col)
    if has_captions:
        kind = schema.field(params.captions_col).type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_string(kind)):
            raise VlkdError(f"column {params.captions_col!r} of URL list {path} is {kind}, not a list of captions; "
                            "point --captions-col at a list<string> column or leave it unset")
    return UrlList(path, params, fmt, has_captions, _stamp(path))


def _stamp(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def _unreadable(path: Path, fmt: str, err: Exception) -> VlkdError:
    reason = str(err).splitlines()[0]
    return VlkdError(f"cannot read URL list {path} as {fmt} ({reason}); check the file and --input-format")


def _format_of(path: Path, requested: str) -> str:
    if requested != "auto":
        return requested
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise VlkdError(
            f"cannot tell the format of {path} from its extension; set --input-format parquet|csv|tsv"
        )
    return fmt


def _schema(path: Path, fmt: str, column_names: list[str] | None) -> pa.Schema:
    if fmt == "parquet":
        return pq.read_schema(path)
    with _open_csv(path, fmt, column_names, lambda row: "skip") as reader:
        return reader.schema


def _open_csv(path: Path, fmt: str, column_names: list[str] | None, on_invalid_row) -> pacsv.CSVStreamingReader:
    delimiter = "\t" if fmt == "tsv" else ","
    names = column_names or _header(path, delimiter)
    return pacsv.open_csv(
        path,
        # Single-threaded so that a malformed line is reported with its line number.
        read_options=pacsv.ReadOptions(column_names=column_names, use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid_row),
        # Everything as text: a caption "2" or a numeric-looking id must stay a string.
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string())),
    )


def _header(path: Path, delimiter: str) -> list[str]:
    with path.open(newline="", encoding="utf-8") as file:
        return next(csv.reader(file, delimiter=delimiter), [])


def _as_strings(column: pa.Array) -> pa.Array:
    return column if pa.types.is_string(column.type) else column.cast(pa.string())


def _as_string_lists(column: pa.Array) -> pa.Array:
    """A list column as lists of strings; a string column (csv, tsv) as one-caption lists."""
    if pa.types.is_string(column.type):
        return pa.array([[value] if value is not None else None for value in column.to_pylist()],
                        pa.list_(pa.string()))
    if not pa.types.is_string(column.type.value_type):
        return column.cast(pa.list_(pa.string()))
    return column
