"""What the filter's folder holds, counted from its files (a refresh summarises the same as a full run):
rows in, kept, dropped per reason, the CLIP-score threshold and the clusters. It is the stage's metrics."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from vlkd.config.filter import FilterParams
from vlkd.data.kept_rows import REASONS, kept_path, rejects_path
from vlkd.filter.state import FrozenState

SUMMARY = "summary.json"
HISTOGRAM_BINS = 40


def summarize(output: Path, files: list[str], state: FrozenState, params: FilterParams) -> dict:
    kept = sum(pq.read_metadata(kept_path(output, name)).num_rows for name in files)
    reasons: Counter[str] = Counter()
    for name in files:
        reasons.update(pq.read_table(rejects_path(output, name), columns=["reason"]).column("reason").to_pylist())
    rows = kept + sum(reasons.values())
    rule = next((name for name in ("clip_score_min", "clip_score_top", "clip_score_null_quantile")
                 if getattr(params, name) is not None), None)
    return {
        "files": len(files),
        "rows": rows,
        "kept": kept,
        "kept_share": round(kept / rows, 6) if rows else 0.0,
        "dropped": {reason: reasons.get(reason, 0) for reason in REASONS},
        "clip_score": {"rule": rule, "threshold": state.clip_threshold},
        "semdedup": {"clusters": state.clusters, "eps": params.semdedup_eps if state.clusters else None,
                     "fitted_on_files": len(state.fitted_on), "sampled_rows": state.sampled_rows},
    }


def score_histogram(output: Path, files: list[str]) -> dict:
    """CLIP scores of the kept rows and of the rows the rules or dedup dropped, on shared bins."""
    kept = [pq.read_table(kept_path(output, n), columns=["clip_score"]).column("clip_score").to_numpy()
            for n in files]
    dropped = [pq.read_table(rejects_path(output, n), columns=["clip_score"]).column("clip_score").to_numpy()
               for n in files]
    kept_all = np.concatenate(kept) if kept else np.empty(0)
    dropped_all = np.concatenate(dropped) if dropped else np.empty(0)
    dropped_all = dropped_all[np.isfinite(dropped_all)]
    values = np.concatenate([kept_all, dropped_all])
    if not len(values):
        return {"edges": [], "kept": [], "dropped": []}
    edges = np.linspace(float(values.min()), float(values.max()) + 1e-6, HISTOGRAM_BINS + 1)
    return {"edges": edges.tolist(), "kept": np.histogram(kept_all, edges)[0].tolist(),
            "dropped": np.histogram(dropped_all, edges)[0].tolist()}
