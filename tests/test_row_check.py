"""The download's bookkeeping without a network: checking a URL list in record batches with Arrow compute
gives what checking it row by row in Python gave, whatever the batch size; the ledger keeps each URL's
latest attempt; the streamed Parquet writer writes pq.write_table's bytes."""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from vlkd.config import DownloadParams
from vlkd.corpus import shards
from vlkd.corpus.keys import caption_keys, url_keys
from vlkd.corpus.parquet_stream import ParquetStream
from vlkd.corpus.row_check import WHITESPACE, check_rows
from vlkd.corpus.url_list import open_url_list
from vlkd.errors import VlkdError

PARAMS = DownloadParams(max_caption_chars=12)


def reference_check(urls: list, captions: list, lists: list | None, max_chars: int) -> dict:
    """The row-by-row check the download did before it read lists in batches (Python strings, urlsplit)."""
    def squeeze(text):
        return " ".join((text or "").split())

    def problem(url):
        if not url:
            return "empty or missing url"
        try:
            parts = urlsplit(url)
        except ValueError as err:
            return f"malformed url ({err})"
        if parts.scheme not in ("http", "https"):
            return f"not an http(s) url (scheme {parts.scheme!r})" if parts.scheme else "not an http(s) url"
        return None if parts.netloc else "url has no host"

    issues = {"captions_truncated": 0, "captions_non_ascii": 0}

    def truncate(text):
        if len(text) > max_chars:
            issues["captions_truncated"] += 1
            return text[:max_chars]
        return text

    seen, valid, invalid, duplicates = set(), [], [], 0
    for row, (url, caption, others) in enumerate(zip(urls, captions, lists or [None] * len(urls), strict=True)):
        url, caption = (url or "").strip(), squeeze(caption)
        reason = problem(url)
        if reason is None and not caption:
            reason = "empty or missing caption"
        if reason is not None:
            invalid.append({"row": row, "url": url, "caption": caption, "reason": reason})
            continue
        if url in seen:
            duplicates += 1
            continue
        seen.add(url)
        caption = truncate(caption)
        issues["captions_non_ascii"] += not caption.isascii()
        extra = [truncate(squeeze(text)) for text in others or []]
        valid.append({"url": url, "caption": caption}
                     | ({"captions": list(dict.fromkeys([caption, *filter(None, extra)]))} if lists else {}))
    return {"valid": valid, "invalid": invalid, "duplicates": duplicates, **issues}


def tricky_rows(count: int, seed: int = 0) -> tuple[list, list, list]:
    """URLs and captions that exercise every rule: whitespace of every kind, schemes, hosts, brackets,
    non-ASCII, tabs inside, empty and null values, long captions, and duplicates far apart."""
    rng = random.Random(seed)
    spaces = list(WHITESPACE) + ["\u200b", "\x00", "\x07"]
    heads = ["http://", "https://", "HTTP://", "hTtPs://", "ftp://", "mailto:", "http:/", "http:", "//", "",
             "h\ttp://", "http://\t", "\x01http://", "1http://", "ht-tp://"]
    hosts = ["127.0.0.1:1", "example.test", "[::1]", "[::1", "::1]", "exämple.test", "a\uff03b.test", "", "?q",
             "/path", "#frag", "user:pw@h.test", "h.test:99999", "h.test\x0b", "[v1.x]"]
    tails = ["", "/a.png", "/ä.png", "/a b.png", "/x?y=[1]", "/a\nb", "/a\r", "#f", "?q=1"]
    words = ["a", "cat", "Zürich", "東京", "", "x" * 20, "é" * 15, "long caption here"]
    urls, captions, lists = [], [], []
    for i in range(count):
        if i > 10 and rng.random() < 0.15:
            url = urls[rng.randrange(i)]  # a duplicate, often in another batch
        elif rng.random() < 0.05:
            url = None
        else:
            usual = rng.random() < 0.7  # most rows of a list are ordinary URLs
            url = rng.choice(heads[:2] if usual else heads) + rng.choice(hosts[:2] if usual else hosts)
            url += rng.choice(tails) + f"/{i}"
            if rng.random() < 0.2:
                url = rng.choice(spaces) + url + rng.choice(spaces)
        caption = None if rng.random() < 0.05 else rng.choice(spaces).join(
            rng.choice(words) for _ in range(rng.randrange(4)))
        captions.append(caption)
        urls.append(url)
        lists.append(None if rng.random() < 0.3 else
                     [None if rng.random() < 0.1 else rng.choice(spaces).join([rng.choice(words), rng.choice(words)])
                      for _ in range(rng.randrange(4))])
    return urls, captions, lists


def checked_as_reference(checked) -> dict:
    valid = [row for batch in checked.valid_batches() for row in batch.to_pylist()]
    return {"valid": valid, "invalid": checked.invalid.to_pylist(), "duplicates": checked.duplicates,
            **checked.caption_issues}


def test_whitespace_is_what_python_strips():
    python = "".join(char for char in map(chr, range(sys.maxunicode + 1)) if char.isspace())
    assert python == WHITESPACE


@pytest.mark.parametrize("with_lists", [False, True])
def test_checking_in_batches_gives_what_checking_row_by_row_gave(tmp_path, with_lists):
    urls, captions, lists = tricky_rows(1500)
    columns = {"url": urls, "caption": captions} | ({"captions": lists} if with_lists else {})
    pq.write_table(pa.table(columns), tmp_path / "list.parquet")
    params = PARAMS.model_copy(update={"captions_col": "captions" if with_lists else None})
    expected = reference_check(urls, captions, lists if with_lists else None, params.max_caption_chars)
    assert expected["duplicates"] > 50 and len(expected["invalid"]) > 300 and len(expected["valid"]) > 500

    for batch_size in (1, 7, 256, 100_000):
        checked = check_rows(open_url_list(tmp_path / "list.parquet", params), params, batch_size)
        assert checked.rows == len(urls)
        assert checked_as_reference(checked) == expected, f"batch size {batch_size}"
        assert checked.valid_count == len(expected["valid"])


def test_a_tsv_of_many_blocks_keeps_its_malformed_lines_numbers(tmp_path):
    # Over one MiB: pyarrow's streaming csv reader parses it in several blocks.
    lines = [f"caption number {i} {'words ' * 5}\thttp://127.0.0.1:1/{i % 9000}.png" for i in range(30_000)]
    for line in (0, 14_999, 29_999):
        lines[line] = "one\ttwo\tthree"
    lines[20_000] = "lonely"
    lines[10] = "\thttp://127.0.0.1:1/empty-caption.png"  # an invalid row, after the first malformed line
    lines[25_000] = "a file\tftp://127.0.0.1:1/x.png"
    (tmp_path / "list.tsv").write_text("\n".join(lines) + "\n")
    assert (tmp_path / "list.tsv").stat().st_size > 2**20
    params = PARAMS.model_copy(update={"column_names": ["caption", "url"]})

    # The whole file at once, as the download read csv/tsv lists before: the same rows and line numbers.
    table = pacsv.read_csv(tmp_path / "list.tsv", read_options=pacsv.ReadOptions(column_names=["caption", "url"]),
                           parse_options=pacsv.ParseOptions(delimiter="\t", invalid_row_handler=lambda row: "skip"))
    expected = reference_check(table.column("url").to_pylist(), table.column("caption").to_pylist(), None, 12)
    malformed = [{"row": None, "url": None, "caption": None, "reason": f"malformed line: {reason}"} for reason in (
        "expected 2 fields, got 3 (line 1)", "expected 2 fields, got 3 (line 15000)",
        "expected 2 fields, got 1 (line 20001)", "expected 2 fields, got 3 (line 30000)")]

    checked = check_rows(open_url_list(tmp_path / "list.tsv", params), params, 4096)
    assert checked.rows == 30_000 and checked.duplicates == 29_994 - 9000
    assert len(expected["invalid"]) == 2
    assert checked_as_reference(checked) == {**expected, "invalid": malformed + expected["invalid"]}


@pytest.mark.parametrize("rows_then", [12, 10])
def test_a_list_that_changes_between_reads_is_one_clear_line(tmp_path, rows_then):
    """The download reads the list again to plan and to account: a list rewritten meanwhile (more rows, or
    as many others) would mix two lists."""
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:1/{i}" for i in range(10)], "caption": ["c"] * 10}),
                   tmp_path / "list.parquet")
    checked = check_rows(open_url_list(tmp_path / "list.parquet", PARAMS), PARAMS, 4)
    time.sleep(0.01)
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:1/{i}" for i in range(rows_then)][::-1],
                             "caption": ["d"] * rows_then}), tmp_path / "list.parquet")
    with pytest.raises(VlkdError, match="changed while the download was reading it"):
        list(checked.valid_batches())


def write_shard(folder, shard_id: int, rows: list[dict], with_lists: bool = False) -> None:
    columns = {name: [row.get(name) for row in rows] for name in ("url", "caption", "key", "status", "error_message")}
    if with_lists:
        columns["captions"] = [row.get("captions") for row in rows]
    pq.write_table(pa.table(columns), folder / f"{shard_id:05d}.parquet")
    (folder / f"{shard_id:05d}{shards.STATS_SUFFIX}").write_text(json.dumps({"count": len(rows)}))


def test_the_ledger_holds_each_urls_latest_attempt(tmp_path):
    def row(url, status, error=None, caption="c", captions=None):
        return {"url": url, "caption": caption, "key": "0", "status": status, "error_message": error,
                "captions": captions}

    write_shard(tmp_path, 0, [row("a", "failed_to_download", "HTTP Error 404: Not Found"), row("b", "success"),
                              row("c", "failed_to_download", "timed out after 1 s")])
    write_shard(tmp_path, 1, [row("a", "success", caption="new", captions=["new", "x"]),
                              row("d", "failed_to_resize", None)], with_lists=True)
    write_shard(tmp_path, 2, [row("c", "failed_to_download", "Image decoding error")])
    (tmp_path / "00003.parquet").write_bytes(b"a shard without its stats file: not complete, not read")
    ledger = shards.read_ledger(tmp_path, "caption and list")

    at = ledger.find(url_keys(pa.array(list("abcde"))))
    outcomes = [None if i < 0 else ledger.outcomes[i] for i in at]
    reasons = [code if code is None or code == shards.SUCCESS else ledger.reasons[code] for code in outcomes]
    assert reasons == [shards.SUCCESS, shards.SUCCESS, "not a decodable image (HTML page, truncated or corrupt file)",
                       "failed_to_resize", None]
    assert len(ledger.keys) == 4 and list(ledger.keys) == sorted(ledger.keys)
    assert list(ledger.caption_keys[at[:2]]) == list(caption_keys(["new", "c"], [["new", "x"], None]))
    assert list(shards.read_ledger(tmp_path, "caption").caption_keys[at[:2]]) == list(caption_keys(["new", "c"]))
    assert not len(shards.read_ledger(tmp_path).caption_keys)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("pieces", [[], [0], [5], [3, 0, 4], [10], [10, 10, 1], [7, 7, 7, 7, 2], [25]])
def test_a_streamed_parquet_file_is_what_write_table_writes(tmp_path, pieces):
    rows = sum(pieces)
    table = pa.table({"url": [f"http://h/{i}" for i in range(rows)], "caption": [f"c{i % 3}" for i in range(rows)]})
    pq.write_table(table, tmp_path / "whole.parquet", row_group_size=10)
    with ParquetStream(tmp_path / "streamed.parquet", table.schema, row_group_rows=10) as out:
        start = 0
        for size in pieces:
            out.write(table.slice(start, size))
            start += size
    assert out.rows == rows
    assert digest(tmp_path / "streamed.parquet") == digest(tmp_path / "whole.parquet")


def test_a_row_count_change_unseen_by_the_clock_is_still_caught(tmp_path, monkeypatch):
    """Where the file's size and mtime cannot tell (a coarse clock), a read that gives another row count does."""
    import vlkd.corpus.url_list as url_list

    monkeypatch.setattr(url_list, "_stamp", lambda path: (0, 0))
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:1/{i}" for i in range(10)], "caption": ["c"] * 10}),
                   tmp_path / "list.parquet")
    checked = check_rows(open_url_list(tmp_path / "list.parquet", PARAMS), PARAMS, 4)
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:1/{i}" for i in range(9)], "caption": ["c"] * 9}),
                   tmp_path / "list.parquet")
    with pytest.raises(VlkdError, match="changed while the download was reading it"):
        list(checked.valid_batches())
