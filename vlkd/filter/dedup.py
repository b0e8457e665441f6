"""Duplicates among the rows the rules keep: exact (the same image bytes, by img2dataset's sha256) and
semantic (SemDeDup: the image embeddings clustered by k-means, then within a cluster a row whose cosine to a
kept row is at least 1 - eps duplicates it).

Both indexes hold only rows already kept, in corpus order (feature file, then row), and a row is compared
with every kept row before it: so the earliest row of a group is the one kept, and a refresh, whose rows
come after all earlier ones, never changes what was kept before. SemDeDup's paper drops a row similar to
any earlier row, kept or not, in an order by distance to the centroid; comparing with kept rows in corpus
order keeps a little more (a chain a~b~c with a !~ c keeps a and c) and is what makes filtering incremental.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
from threadpoolctl import threadpool_limits

ASSIGN_CHUNK = 65536  # rows per matrix product with the centroids: bounded memory at any corpus size


class ExactIndex:
    """sha256 -> the kept row ("FILE/key") with those image bytes."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}

    def add(self, sha256: str | None, ident: str) -> None:
        if sha256 is not None:
            self.first.setdefault(sha256, ident)

    def duplicate_of(self, sha256: str | None) -> str | None:
        return None if sha256 is None else self.first.get(sha256)


class SemanticIndex:
    """The kept rows' image embeddings (float16), grouped by their nearest centroid."""

    def __init__(self, centroids: np.ndarray, eps: float):
        self.centroids = centroids.astype(np.float32)
        self.threshold = 1.0 - eps
        self.embeddings: dict[int, list[np.ndarray]] = defaultdict(list)
        self.ids: dict[int, list[str]] = defaultdict(list)

    @property
    def rows(self) -> int:
        return sum(len(ids) for ids in self.ids.values())

    def assign(self, image: np.ndarray) -> np.ndarray:
        """Each row's cluster: its nearest centroid by cosine (ties: the lower index)."""
        clusters = np.empty(len(image), dtype=np.int32)
        for start in range(0, len(image), ASSIGN_CHUNK):
            chunk = image[start:start + ASSIGN_CHUNK].astype(np.float32)
            clusters[start:start + len(chunk)] = np.argmax(chunk @ self.centroids.T, axis=1)
        return clusters

    def add(self, cluster: int, image: np.ndarray, ids: list[str]) -> None:
        if len(ids):
            self.embeddings[cluster].append(image.astype(np.float16))
            self.ids[cluster].extend(ids)

    def _kept(self, cluster: int) -> np.ndarray:
        parts = self.embeddings.get(cluster)
        if not parts:
            return np.empty((0, self.centroids.shape[1]), dtype=np.float32)
        if len(parts) > 1:  # one matrix per cluster from now on
            self.embeddings[cluster] = parts = [np.concatenate(parts)]
        return parts[0].astype(np.float32)

    def deduplicate(self, clusters: np.ndarray, image: np.ndarray, ids: list[str]
                    ) -> tuple[list[str | None], np.ndarray]:
        """For rows in corpus order (with their clusters): the kept row each duplicates (or None) and the
        cosine to it; the rows that are not duplicates join the index. The products are small (a file's
        few rows of a cluster against its kept rows), where BLAS threads cost more than they bring:
        benchmarks/filter.py measured 5.3 times less time for them on one thread at 1M rows."""
        with threadpool_limits(limits=1, user_api="blas"):
            return self._deduplicate(clusters, image, ids)

    def _deduplicate(self, clusters: np.ndarray, image: np.ndarray, ids: list[str]
                     ) -> tuple[list[str | None], np.ndarray]:
        duplicate_of: list[str | None] = [None] * len(ids)
        similarity = np.full(len(ids), np.nan, dtype=np.float32)
        for cluster in np.unique(clusters):
            members = np.flatnonzero(clusters == cluster)
            embeddings = image[members].astype(np.float32)
            kept_before, kept_ids = self._kept(int(cluster)), self.ids[int(cluster)]
            to_old = embeddings @ kept_before.T if len(kept_ids) else None
            within = embeddings @ embeddings.T
            kept_here: list[int] = []
            for j, row in enumerate(members):
                best, best_id = -np.inf, None
                if to_old is not None:
                    k = int(np.argmax(to_old[j]))
                    best, best_id = float(to_old[j, k]), kept_ids[k]
                if kept_here:
                    k = kept_here[int(np.argmax(within[j, kept_here]))]
                    if within[j, k] > best:
                        best, best_id = float(within[j, k]), ids[members[k]]
                if best >= self.threshold:
                    duplicate_of[row], similarity[row] = best_id, best
                else:
                    kept_here.append(j)
            self.add(int(cluster), embeddings[kept_here], [ids[members[j]] for j in kept_here])
        return duplicate_of, similarity


def fit_centroids(sample: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """Spherical k-means of `sample` (faiss, as SemDeDup clusters), on one thread: the same sample gives
    the same centroids bit for bit, which a multi-threaded reduction does not promise."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it loads, at INFO
    import faiss

    clusters = min(clusters, len(sample))
    data = np.ascontiguousarray(sample, dtype=np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        kmeans = faiss.Kmeans(data.shape[1], clusters, niter=20, seed=seed, spherical=True,
                              max_points_per_centroid=max(1, len(data) // clusters + 1), verbose=False)
        kmeans.train(data)
    finally:
        faiss.omp_set_num_threads(threads)
    return np.asarray(kmeans.centroids, dtype=np.float32)
