"""What the first run fixes and every later run reuses: the CLIP-score threshold (when the params give a
fraction or a quantile rather than a number) and SemDeDup's centroids.

Both depend on the rows they are computed from; computed again on a grown corpus they would move, and the
rows kept before would no longer be the rows the rules keep. So they are computed once, from the feature
files present at the first run, and written into the filter's folder (state.json, centroids.npy). The
same first files give the same state bit for bit. A change of the teacher or of the params that shape the
state starts a new state, and then every file is filtered again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from vlkd.config.filter import FilterParams
from vlkd.data.feature_store import FeatureStore, fixed_size_to_numpy
from vlkd.filter.dedup import fit_centroids
from vlkd.filter.rules import clip_scores, null_scores, threshold_from
from vlkd.io import write_json_atomic
from vlkd.record import fingerprint

log = logging.getLogger(__name__)

STATE = "state.json"
CENTROIDS = "centroids.npy"
STATE_PARAMS = ("clip_score_min", "clip_score_top", "clip_score_null_quantile", "semdedup_clusters",
                "semdedup_sample_per_cluster", "seed")


@dataclass(frozen=True)
class FrozenState:
    teacher: dict
    params: dict  # the STATE_PARAMS it was computed with
    clip_threshold: float | None
    clusters: int  # 0: no semantic dedup
    fitted_on: list[str]  # the feature files of the first run
    sampled_rows: int
    centroids_sha256: str | None

    @property
    def digest(self) -> str:
        return fingerprint(asdict(self))


def state_params(params: FilterParams) -> dict:
    return {name: getattr(params, name) for name in STATE_PARAMS}


def load_or_fit(params: FilterParams, store: FeatureStore, folder: Path) -> tuple[FrozenState, np.ndarray | None]:
    """The state in `folder` if it was made for this teacher and these params, else a new one fitted on the
    store's files (and written)."""
    saved = _load(folder)
    if saved is not None:
        state, centroids = saved
        if state.teacher == store.teacher and state.params == state_params(params):
            return state, centroids
        log.info("filter: the recorded threshold and centroids were made for another teacher or other params; "
                 "fitting them again on the %d feature file(s) present, and filtering every file again",
                 len(store.files))
    state, centroids = _fit(params, store)
    if centroids is not None:
        np.save(folder / CENTROIDS, centroids)
    write_json_atomic(folder / STATE, asdict(state))
    return state, centroids


def _load(folder: Path) -> tuple[FrozenState, np.ndarray | None] | None:
    path = folder / STATE
    if not path.is_file():
        return None
    try:
        state = FrozenState(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None
    if not state.clusters:
        return state, None
    centroids_file = folder / CENTROIDS
    if not centroids_file.is_file() or _sha256(np.load(centroids_file)) != state.centroids_sha256:
        return None
    return state, np.load(centroids_file)


def _fit(params: FilterParams, store: FeatureStore) -> tuple[FrozenState, np.ndarray | None]:
    """One pass over the files: every row's score, the null scores, and a seeded sample for k-means."""
    total = store.num_rows
    quota = (params.semdedup_clusters or 0) * params.semdedup_sample_per_cluster
    share = min(1.0, quota / total) if total else 0.0
    scores, null, sample = [], [], []
    for index, path in enumerate(store.files):
        table = pq.read_table(path, columns=["image_embedding", "text_embedding"])
        image = fixed_size_to_numpy(table.column("image_embedding")).astype(np.float32)
        text = fixed_size_to_numpy(table.column("text_embedding")).astype(np.float32)
        finite = np.isfinite(image).all(axis=1) & np.isfinite(text).all(axis=1)
        scores.append(clip_scores(image[finite], text[finite]))
        null.append(null_scores(image[finite], text[finite], seed=params.seed + index))
        if share:
            chosen = np.random.default_rng([params.seed, index]).random(len(image)) < share
            sample.append(image[chosen & finite].astype(np.float16))  # as stored: half the memory until the fit
    threshold = threshold_from(params, scores, null)
    centroids = None
    if params.semdedup_clusters and sample and sum(len(s) for s in sample):
        points = np.concatenate(sample)
        if len(points) < params.semdedup_clusters:
            log.warning("filter: %d sampled rows make at most %d clusters, not semdedup_clusters %d",
                        len(points), len(points), params.semdedup_clusters)
        centroids = fit_centroids(points, params.semdedup_clusters, params.seed)
    state = FrozenState(teacher=store.teacher, params=state_params(params),
                        clip_threshold=None if threshold is None or math.isnan(threshold) else round(threshold, 6),
                        clusters=0 if centroids is None else len(centroids),
                        fitted_on=[path.name for path in store.files],
                        sampled_rows=int(sum(len(s) for s in sample)),
                        centroids_sha256=None if centroids is None else _sha256(centroids))
    return state, centroids


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
