"""The download stage: a URL list into img2dataset webdataset shards, incremental and resumable.

    read and check the list -> recover a killed run -> fetch only new URLs into new shards
    -> adopt complete shards -> account for every row (summary.json, failed.parquet)

img2dataset does the downloading, resizing and shard writing. Its own entry point is not used because
its incremental mode keys on shard numbers: rows added to a list that land in an already finished shard
number are silently skipped. Here the rows to fetch are computed by URL against every shard's parquet,
and img2dataset's reader is started at the first unused shard number, so existing shards are never
rewritten and a refresh costs in proportion to the new rows.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlkd.config import DownloadParams
from vlkd.corpus import shards
from vlkd.corpus.shard_writer import KeyOrderedWebDatasetWriter
from vlkd.corpus.url_list import CheckedRows, check_rows, read_url_list
from vlkd.errors import VlkdError
from vlkd.io import remove_path, tmp_path_for, write_json_atomic

# img2dataset imports albumentations, which otherwise asks the network for a newer version.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

log = logging.getLogger(__name__)

STAGING = "_staging"
USER_AGENT_TOKEN = "vlkd"  # in the User-Agent, and the name an X-Robots-Tag directive can address
PLAN, PLAN_ROWS, PLAN_LAYOUT = "_plan", "rows.parquet", "layout.json"  # under STAGING while a run fetches
SUMMARY = "summary.json"
FAILED = "failed.parquet"
LOCK = ".lock"
NOT_RECORDED = "not recorded by img2dataset (its shard failed); run again to retry"


def download(url_list: Path, output: Path, params: DownloadParams, retry_failed: bool = False) -> dict:
    """Bring `output` up to date with `url_list`; returns the summary also written to summary.json, plus
    `this_run` (what this run fetched and how long it took), which no file of the shards holds."""
    started = time.perf_counter()
    checked = check_rows(read_url_list(url_list, params), params)
    output.mkdir(parents=True, exist_ok=True)
    with _exclusive(output):
        staging = output / STAGING
        resumed, new_shards = _finish_interrupted_run(staging, output, params)
        ledger = shards.read_ledger(output)
        pending = _rows_to_fetch(checked.valid, ledger.outcomes(), retry_failed)
        changed = _captions_changed(checked.valid, ledger)
        if changed:
            log.warning("%d URL(s) of %s are in the shards with other captions than the list gives now; the shards "
                        "keep the captions they were downloaded with (downloads are incremental by URL); to take "
                        "the new captions, download into an empty --output", changed, url_list)
        if pending.num_rows:
            log.info("fetching %d new URL(s) of %d usable", pending.num_rows, checked.valid.num_rows)
            new_shards += _fetch(pending, staging, output, shards.next_shard_id(output), params)
        else:
            log.info("all %d usable URL(s) are in the shards already", checked.valid.num_rows)
        staging.rmdir()
        outcomes = shards.read_ledger(output).outcomes()
        summary = summarize(checked, outcomes, output)
        summary["url_list"]["captions_changed"] = changed
        _write_failed(checked, outcomes, output / FAILED)
        write_json_atomic(output / SUMMARY, summary)
    summary["this_run"] = {
        "fetched": resumed + pending.num_rows,
        "new_shards": new_shards,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return summary


def _fetch(rows: pa.Table, staging: Path, output: Path, start_shard_id: int,
           params: DownloadParams, done: frozenset[int] = frozenset()) -> list[int]:
    """Download `rows` into shards numbered from `start_shard_id` (but `done`) and move them into `output`.

    The plan (the rows and where their shards start) is written first, so that a killed run is finished
    by the next one with the same row-to-shard assignment: a resumed download gives the bytes an
    uninterrupted one would have."""
    plan = staging / PLAN
    if not plan.is_dir():
        plan.mkdir(parents=True)
        pq.write_table(rows, plan / PLAN_ROWS)
        write_json_atomic(plan / PLAN_LAYOUT, {"start_shard_id": start_shard_id, "shard_size": params.shard_size})
    _run_img2dataset(plan / PLAN_ROWS, rows.num_rows, staging, start_shard_id, params, done)
    adopted = shards.adopt(staging, output)
    shards.reset_staging(staging)
    return adopted


def _finish_interrupted_run(staging: Path, output: Path,
                            params: DownloadParams) -> tuple[int, list[int]]:
    """Keep what a killed run finished, drop what it left half-written, and fetch the rest of its plan
    into the shard numbers it had planned; returns (rows fetched, shards written) by this run."""
    kept = shards.adopt(staging, output) if staging.exists() else []
    if kept:
        log.info("kept %d shard(s) finished by an interrupted run: %s", len(kept), kept)
    shards.remove_incomplete(output)
    plan = _read_plan(staging / PLAN, params)
    if plan is None:
        shards.reset_staging(staging)
        return 0, []
    rows, start = plan
    planned = range(start, start + math.ceil(rows.num_rows / params.shard_size))
    done = frozenset(planned) & frozenset(shards.complete_shards(output))
    if len(done) == len(planned):
        shards.reset_staging(staging)
        return 0, []
    log.info("finishing the interrupted run: shard(s) %s", sorted(set(planned) - done))
    for name in list(staging.iterdir()):
        if name.name != PLAN:
            remove_path(name)
    fetched = sum(min(params.shard_size, rows.num_rows - (i - start) * params.shard_size)
                  for i in planned if i not in done)
    return fetched, _fetch(rows, staging, output, start, params, done)


def _read_plan(plan: Path, params: DownloadParams) -> tuple[pa.Table, int] | None:
    """An interrupted run's plan, if there is a whole one that the current shard size can finish."""
    try:
        layout = json.loads((plan / PLAN_LAYOUT).read_text())
        rows = pq.read_table(plan / PLAN_ROWS)
    except (OSError, ValueError, pa.ArrowException):
        return None
    if layout["shard_size"] != params.shard_size:
        log.warning("an interrupted download planned shards of %d rows, download.shard_size is now %d: its "
                    "unfinished rows are fetched as new rows", layout["shard_size"], params.shard_size)
        return None
    return rows, int(layout["start_shard_id"])


@contextmanager
def _exclusive(output: Path) -> Iterator[None]:
    """One download per output folder at a time: a second one stops with a clear line."""
    with (output / LOCK).open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise VlkdError(
                f"another download is writing to {output}; wait for it to finish or use another --output"
            ) from err
        yield


def _rows_to_fetch(valid: pa.Table, outcomes: dict[str, str | None], retry_failed: bool) -> pa.Table:
    """Usable rows whose URL no shard holds yet (with `retry_failed`, also those that failed before)."""
    done = [url for url, failure in outcomes.items() if failure is None or not retry_failed]
    return valid.filter(pc.invert(pc.is_in(valid.column("url"), pa.array(done, pa.string()))))


def _captions_changed(valid: pa.Table, ledger: shards.Ledger) -> int:
    """Rows whose URL the shards hold as a success, stored with another caption, or (when the list has a
    captions column) another caption list, than the row gives now."""
    stored = ledger.table.filter(pc.equal(ledger.table.column("status"), "success"))
    has_lists = "captions" in valid.column_names
    by_url = {url: (caption, lists) for url, caption, lists in zip(
        stored.column("url").to_pylist(), stored.column("caption").to_pylist(),
        stored.column("captions").to_pylist() if "captions" in stored.column_names else [None] * stored.num_rows,
        strict=True)}
    rows = zip(valid.column("url").to_pylist(), valid.column("caption").to_pylist(),
               valid.column("captions").to_pylist() if has_lists else [None] * valid.num_rows, strict=True)
    return sum(url in by_url and (by_url[url][0] != caption or (has_lists and by_url[url][1] != lists))
               for url, caption, lists in rows)


def _run_img2dataset(input_file: Path, rows: int, staging: Path, start_shard_id: int, params: DownloadParams,
                     done: frozenset[int]) -> None:
    """img2dataset's own reader, resizer, downloader and distributor, started at `start_shard_id`, skipping
    the shards in `done`, writing with vlkd's reproducible writer."""
    from img2dataset import distributor as distributors
    from img2dataset.downloader import Downloader
    from img2dataset.reader import Reader
    from img2dataset.resizer import Resizer

    tmp = staging / "_tmp"
    tmp.mkdir()
    reader = Reader(
        url_list=str(input_file), input_format="parquet", url_col="url", caption_col="caption",
        verify_hash_col=None, verify_hash_type=None,
        save_additional_columns=["captions"] if "captions" in pq.read_schema(input_file).names else None,
        number_sample_per_shard=params.shard_size, done_shards=set(done), tmp_path=str(tmp),
        start_shard_id=start_shard_id,
    )
    resizer = Resizer(
        image_size=params.image_size, resize_mode=params.resize_mode, resize_only_if_bigger=False,
        encode_quality=params.encode_quality, encode_format=params.encode_format,
        max_image_area=params.max_image_area,
    )
    downloader = Downloader(
        sample_writer_class=KeyOrderedWebDatasetWriter, resizer=resizer, thread_count=params.threads,
        save_caption=True, extract_exif=False, output_folder=str(staging), column_list=reader.column_list,
        timeout=params.timeout, number_sample_per_shard=params.shard_size, oom_shard_count=5,
        compute_hash="sha256", verify_hash_type=None, encode_format=params.encode_format,
        retries=params.retries, user_agent_token=USER_AGENT_TOKEN,
        disallowed_header_directives=[d.lower() for d in params.disallowed_header_directives] or None,
    )
    _check_engine(params.distributor)
    distribute = {
        "multiprocessing": distributors.multiprocessing_distributor,
        "pyspark": distributors.pyspark_distributor,
        "ray": distributors.ray_distributor,
    }[params.distributor]
    shard_count = math.ceil(rows / params.shard_size) - len(done)
    if shard_count == 1 and params.distributor == "multiprocessing":
        # One shard is one process's work anyway; a worker pool would only add its start-up (about 3 s of
        # spawning and importing img2dataset), which dominates a small refresh.
        failed = [row for row in reader if not downloader(row)[0]]
        for row in failed:  # one retry, as img2dataset's distributors do
            downloader(row)
        return
    distribute(min(params.processes, shard_count), downloader, reader, 1000, 1)


def _check_engine(distributor: str) -> None:
    """A distributor whose library is missing is one clear line: img2dataset's ray distributor would
    otherwise do nothing, silently. Spark's local Python workers run this interpreter unless the user's
    PYSPARK_PYTHON says otherwise (on a cluster, the executors' own Python needs vlkd installed)."""
    install = {"pyspark": "pip install -e '.[spark]'", "ray": "pip install -e '.[ray]'"}.get(distributor)
    if install is None:
        return
    if importlib.util.find_spec(distributor) is None:
        raise VlkdError(f"download.distributor is {distributor} but {distributor} is not installed; install it "
                        f"({install}) or set download.distributor: multiprocessing")
    if distributor == "pyspark":
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def summarize(checked: CheckedRows, outcomes: dict[str, str | None], output: Path) -> dict:
    """Account for every row of the list, and roll up every shard of the folder."""
    failures: Counter[str] = Counter()
    successes = 0
    for url in checked.valid.column("url").to_pylist():
        reason = outcomes.get(url, NOT_RECORDED)
        if reason is None:
            successes += 1
        else:
            failures[reason] += 1
    invalid = Counter(checked.invalid.column("reason").to_pylist())
    stats = [json.loads((output / f"{i:05d}{shards.STATS_SUFFIX}").read_text())
             for i in shards.complete_shards(output)]
    summary = {
        "url_list": {
            "rows": checked.rows,
            "successes": successes,
            "failures": sum(failures.values()),
            "duplicates": checked.duplicates,
            "invalid": sum(invalid.values()),
            "failures_by_reason": dict(failures.most_common()),
            "invalid_by_reason": dict(invalid.most_common()),
            **checked.caption_issues,
        },
        "shards": {
            "count": len(stats),
            "samples": sum(s["successes"] for s in stats),
            "attempts": sum(s["count"] for s in stats),
        },
    }
    url_list = summary["url_list"]
    accounted = url_list["successes"] + url_list["failures"] + url_list["duplicates"] + url_list["invalid"]
    assert accounted == checked.rows, f"row accounting is off: {accounted} != {checked.rows}"
    return summary


def _write_failed(checked: CheckedRows, outcomes: dict[str, str | None], path: Path) -> None:
    """Every row of the list that yielded no sample, with its reason: failed downloads and invalid rows."""
    valid = checked.valid
    failed = [{"url": url, "caption": caption, "reason": outcomes.get(url, NOT_RECORDED), "kind": "download"}
              for url, caption in zip(valid.column("url").to_pylist(), valid.column("caption").to_pylist(),
                                      strict=True)
              if outcomes.get(url, NOT_RECORDED) is not None]
    failed += [{"url": row["url"], "caption": row["caption"], "reason": row["reason"], "kind": "invalid"}
               for row in checked.invalid.to_pylist()]
    schema = pa.schema([(name, pa.string()) for name in ("url", "caption", "reason", "kind")])
    tmp = tmp_path_for(path)
    pq.write_table(pa.Table.from_pylist(failed, schema=schema), tmp)
    tmp.replace(path)
