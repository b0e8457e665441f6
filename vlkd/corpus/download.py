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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlkd.config import DownloadParams
from vlkd.corpus import shards
from vlkd.corpus.accounting import FAILED, SUMMARY, outcomes_of, summarize, write_failed
from vlkd.corpus.parquet_stream import ParquetStream
from vlkd.corpus.row_check import BATCH_ROWS, CheckedRows, check_rows
from vlkd.corpus.shard_writer import KeyOrderedWebDatasetWriter
from vlkd.corpus.url_list import open_url_list
from vlkd.errors import VlkdError
from vlkd.io import remove_path, write_json_atomic

# img2dataset imports albumentations, which otherwise asks the network for a newer version.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

log = logging.getLogger(__name__)

STAGING = "_staging"
USER_AGENT_TOKEN = "vlkd"  # in the User-Agent, and the name an X-Robots-Tag directive can address
PLAN, PLAN_ROWS, PLAN_LAYOUT = "_plan", "rows.parquet", "layout.json"  # under STAGING while a run fetches
LOCK = ".lock"


def download(url_list: Path, output: Path, params: DownloadParams, retry_failed: bool = False,
             batch_size: int = BATCH_ROWS) -> dict:
    """Bring `output` up to date with `url_list`; returns the summary also written to summary.json, plus
    `this_run` (what this run fetched and how long it took), which no file of the shards holds. The list is
    read `batch_size` rows at a time."""
    started = time.perf_counter()
    checked = check_rows(open_url_list(url_list, params), params, batch_size)
    output.mkdir(parents=True, exist_ok=True)
    with _exclusive(output):
        staging = output / STAGING
        resumed, new_shards = _finish_interrupted_run(staging, output, params)
        ledger = shards.read_ledger(output, "caption and list" if checked.has_captions else "caption")
        pending = _rows_to_fetch(checked, ledger, retry_failed)
        fetching = int(np.count_nonzero(pending))
        changed = _captions_changed(checked, ledger)
        del ledger  # the fetch adds shards: the accounting reads the ledger again, and need not hold both
        if changed:
            log.warning("%d URL(s) of %s are in the shards with other captions than the list gives now; the shards "
                        "keep the captions they were downloaded with (downloads are incremental by URL); to take "
                        "the new captions, download into an empty --output", changed, url_list)
        if fetching:
            log.info("fetching %d new URL(s) of %d usable", fetching, checked.valid_count)
            start_shard_id = shards.next_shard_id(output)
            _write_plan(checked, pending, staging / PLAN, start_shard_id, params)
            new_shards += _fetch(fetching, staging, output, start_shard_id, params)
        else:
            log.info("all %d usable URL(s) are in the shards already", checked.valid_count)
        staging.rmdir()
        outcomes = outcomes_of(checked, shards.read_ledger(output))
        summary = summarize(checked, outcomes, output)
        summary["url_list"]["captions_changed"] = changed
        write_failed(checked, outcomes, output / FAILED)
        write_json_atomic(output / SUMMARY, summary)
    summary["this_run"] = {
        "fetched": resumed + fetching,
        "new_shards": new_shards,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return summary


def _write_plan(checked: CheckedRows, pending: np.ndarray, plan: Path, start_shard_id: int,
                params: DownloadParams) -> None:
    """The rows to fetch (the usable rows where `pending`) and where their shards start, written before any
    is fetched, so that a killed run is finished by the next one with the same row-to-shard assignment: a
    resumed download gives the bytes an uninterrupted one would have."""
    plan.mkdir(parents=True)
    schema = pa.schema([("url", pa.string()), ("caption", pa.string())]
                       + ([("captions", pa.list_(pa.string()))] if checked.has_captions else []))
    with ParquetStream(plan / PLAN_ROWS, schema) as rows:
        for batch, _ in checked.valid_rows_where(pending):
            rows.write(batch)
    write_json_atomic(plan / PLAN_LAYOUT, {"start_shard_id": start_shard_id, "shard_size": params.shard_size})


def _fetch(rows: int, staging: Path, output: Path, start_shard_id: int,
           params: DownloadParams, done: frozenset[int] = frozenset()) -> list[int]:
    """Download the plan's `rows` into shards numbered from `start_shard_id` (but `done`) and move them into
    `output`."""
    _run_img2dataset(staging / PLAN / PLAN_ROWS, rows, staging, start_shard_id, params, done)
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
    planned = range(start, start + math.ceil(rows / params.shard_size))
    done = frozenset(planned) & frozenset(shards.complete_shards(output))
    if len(done) == len(planned):
        shards.reset_staging(staging)
        return 0, []
    log.info("finishing the interrupted run: shard(s) %s", sorted(set(planned) - done))
    for name in list(staging.iterdir()):
        if name.name != PLAN:
            remove_path(name)
    fetched = sum(min(params.shard_size, rows - (i - start) * params.shard_size)
                  for i in planned if i not in done)
    return fetched, _fetch(rows, staging, output, start, params, done)


def _read_plan(plan: Path, params: DownloadParams) -> tuple[int, int] | None:
    """An interrupted run's plan (its rows, its first shard), if there is a whole one that the current shard
    size can finish. The rows file is written before the layout, so a plan with a layout has all its rows:
    its footer says how many."""
    try:
        layout = json.loads((plan / PLAN_LAYOUT).read_text())
        rows = pq.read_metadata(plan / PLAN_ROWS).num_rows
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


def _rows_to_fetch(checked: CheckedRows, ledger: shards.Ledger, retry_failed: bool) -> np.ndarray:
    """Per usable row: no shard holds its URL yet (with `retry_failed`, or its latest attempt failed)."""
    at = ledger.find(checked.valid_keys)
    held = at >= 0
    if retry_failed:
        held[held] = ledger.outcomes[at[held]] == shards.SUCCESS
    return ~held


def _captions_changed(checked: CheckedRows, ledger: shards.Ledger) -> int:
    """Rows whose URL the shards hold as a success, stored with another caption, or (when the list has a
    captions column) another caption list, than the row gives now."""
    at = ledger.find(checked.valid_keys)
    held = at >= 0
    stored = ledger.caption_keys[at[held]]  # read as the list has them: with caption lists or without
    success = ledger.outcomes[at[held]] == shards.SUCCESS
    return int(np.count_nonzero(success & (stored != checked.caption_keys[held])))


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
