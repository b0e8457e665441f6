"""Throughput and peak memory of the filter stage (`vlkd filter`) on synthetic ViT-L-14-sized rows, and how
its deduplication's cost grows with the corpus.

    .venv/bin/python benchmarks/filter.py [--rows 100000 1000000] [--file-rows 10000] [--refresh-share 0.05]
                                          [--profile-rows 100000] [--skip-baselines] [--code head|worktree]
                                          [--workdir DIR] [--keep-data]

1,000,000 rows take ~3.3 GB in the work folder (a temp folder under --workdir, removed at the end) and
about half an hour on 2 busy cores.

For each size N the corpus is written once (seeded): feature files of --file-rows rows as the features stage
writes them (`feature_schema` + `fixed_size_array`, float16, 768-d, L2-normalised, no image_tokens column,
row groups of 256, the writer's metadata with a fake ViT-L-14 teacher fingerprint) and one img2dataset-style
metadata Parquet per shard (key, status, original size, sha256; 5% failed downloads with no feature row).
The rows are web-like: image embeddings around 2,000 random centres of Zipf-like popularity, 5% exact
duplicates of an earlier image (same sha256 and embedding, another caption), 5% near-duplicates (an earlier
image's embedding plus noise, cosine ~0.99, new sha256), text embeddings correlated with the image for 90%
of rows and random for 10%, short English captions from templates, 5% German/French/Spanish/Italian ones,
2% boilerplate or one-word captions, 2% images under 200 px and 0.5% with an aspect ratio over 3.

The params are FilterParams' defaults (the paper's recipe: SemDeDup with 1,000 clusters, eps 0.05,
languages [en], exact dedup, DataComp's basic size and caption rules) except that the CLIP-score rule is
clip_score_top 0.7 (DataComp's "keep the top 70%") instead of clip_score_min 0.28: synthetic embeddings'
cosines are not on a real teacher's scale, so a fixed threshold would keep all or nothing.

Each measurement is `filter_corpus` in a fresh subprocess (peak RSS: its VmHWM), in this order:
  recipe               the first run on N rows: fit the frozen state (k-means, threshold) + filter every file
  recipe, 1 BLAS thread  the same with OPENBLAS_NUM_THREADS=1 (numpy's BLAS; SemDeDup's products are small)
  no semdedup          the same corpus, semdedup_clusters null (fresh output folder)
  no semdedup, no lang the same, languages null too: the size, caption, CLIP-score rules and exact dedup only
  refresh +5%          --refresh-share x N new rows (new feature files) added; the recipe's output rerun:
                       only the new files are filtered, every earlier file's kept rows rejoin the indexes
Each child times the stage's phases by wrapping its functions (hashing, state fit and its k-means, reading,
the rules and their language identification, SemDeDup's assignment and comparison, writing, re-indexing
earlier kept rows, summary and report) and reads VmHWM after the state fit, after the file loop and at the
end, to say where the peak is. With --profile-rows N the recipe's first run at that size also runs once more
under cProfile and the top functions by cumulative time are printed. Every child imports one copy of vlkd made
at the start (--code head: the committed package, the default; worktree: the working tree), since a feature
file's filter outputs record the code that made them. Nothing here uses a network address.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import math
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBED_DIM = 768
CENTRES = 2000
SEED = 0
RESERVOIR = 20_000  # earlier rows a duplicate can copy (reservoir-sampled over the whole corpus so far)
ROW_GROUP = 256  # the features stage writes one row group per batch (features.batch_size)
TEACHER = {"model": "ViT-L-14", "weights_sha256": "0" * 64, "open_clip_version": "2.26.1"}
VARIANTS = {  # name: (params overrides, environment)
    "recipe": ({}, {}),
    # the same computation with numpy's OpenBLAS on one thread: SemDeDup's products are small (a file's few
    # rows of a cluster against its kept rows), where two BLAS threads on two busy cores mostly wait
    "recipe, 1 BLAS thread": ({}, {"OPENBLAS_NUM_THREADS": "1"}),
    "no semdedup": ({"semdedup_clusters": None}, {}),
    "no semdedup, no lang": ({"semdedup_clusters": None, "languages": None}, {}),
}

# -- the synthetic corpus ------------------------------------------------------------------------------------
ADJ = ["red", "small", "old", "beautiful", "white", "wooden", "modern", "vintage", "green", "large", "cute", "blue",
       "black", "happy", "empty", "bright", "cozy", "rustic", "golden", "tall"]
NOUN = ["dog", "cat", "house", "car", "woman", "man", "table", "chair", "bridge", "tree", "boat", "bicycle",
        "kitchen", "garden", "dress", "cake", "mountain", "lamp", "sofa", "horse", "child", "church", "train"]
VERB = ["standing", "sitting", "walking", "parked", "lying", "running", "shown", "waiting", "resting"]
PREP = ["in", "near", "on", "next to", "behind", "in front of"]
PLACE = ["park", "beach", "street", "city", "forest", "living room", "market", "lake", "snow", "field", "station"]
TIME = ["sunset", "night", "dawn", "noon", "christmas", "the weekend"]
EN = [
    "a {a} {n} {p} the {pl}",
    "{A} {n} {v} {p} a {pl}",
    "photo of a {a} {n} {p} the {pl} at {t}",
    "the {a} {n} {v} in the {pl}",
    "{A} {n} for sale - {a} {n2} with {a2} details",
    "view of the {pl} from a {a} {n} on a summer day",
    "how to choose the best {a} {n} for your {pl}",
    "{A} and {a2} {n} {v} by the {pl}, {t}",
]
FOREIGN = [
    "ein {de_a} {de_n} im {de_pl} bei Sonnenuntergang",
    "der {de_a} {de_n} steht vor dem Haus",
    "une {fr_n} {fr_a} dans le {fr_pl} au coucher du soleil",
    "photo d'une {fr_n} {fr_a} près de la plage",
    "un {es_n} {es_a} en la {es_pl} al atardecer",
    "foto de un {es_n} {es_a} junto al mar",
    "una {it_n} {it_a} nel {it_pl} al tramonto",
]
DE = {"de_a": ["rote", "kleine", "alte", "schöne"], "de_n": ["Hund", "Baum", "Wagen", "Tisch"],
      "de_pl": ["Garten", "Wald", "Park", "Schnee"]}
FR = {"fr_n": ["maison", "voiture", "chaise", "robe"], "fr_a": ["blanche", "rouge", "ancienne", "petite"],
      "fr_pl": ["jardin", "parc", "village", "marché"]}
ES = {"es_n": ["perro", "coche", "árbol", "barco"], "es_a": ["rojo", "pequeño", "viejo", "bonito"],
      "es_pl": ["playa", "ciudad", "montaña", "calle"]}
IT = {"it_n": ["casa", "barca", "chiesa", "torta"], "it_a": ["bianca", "rossa", "antica", "piccola"],
      "it_pl": ["giardino", "bosco", "paese", "porto"]}
BOILERPLATE = ["IMG_{d4}.jpg", "DSC_{d4}", "click here to enlarge", "royalty-free stock photo", "a picture {d2}",
               "untitled", "image", "photo_{d4}.png", "tap to zoom", "stock image"]
SHORT = ["dog", "sale", "home", "new", "summer", "logo", "map"]


def caption(rng, kind: str) -> str:
    """One caption: kind is en, foreign, boilerplate or short."""
    pick = lambda words: words[int(rng.integers(len(words)))]  # noqa: E731
    if kind == "boilerplate":
        return pick(BOILERPLATE).format(d4=int(rng.integers(1000, 9999)), d2=int(rng.integers(1, 99)))
    if kind == "short":
        return pick(SHORT)
    if kind == "foreign":
        return pick(FOREIGN).format(**{k: pick(v) for d in (DE, FR, ES, IT) for k, v in d.items()})
    adjective = pick(ADJ)
    return pick(EN).format(a=adjective, A=adjective.capitalize(), a2=pick(ADJ), n=pick(NOUN), n2=pick(NOUN),
                           v=pick(VERB), p=pick(PREP), pl=pick(PLACE), t=pick(TIME))


def unit(x):
    import numpy as np

    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Corpus:
    """A seeded stream of shards; rows of later shards duplicate rows of earlier ones (and of their own)."""

    def __init__(self, seed: int = SEED):
        import numpy as np

        rng = np.random.default_rng(seed)
        self.seed = seed
        self.centres = unit(rng.standard_normal((CENTRES, EMBED_DIM))).astype(np.float32)
        popularity = 1.0 / np.arange(1, CENTRES + 1) ** 0.8  # a few huge clusters (product shots), a long tail
        self.popularity = popularity / popularity.sum()
        self.pool_image = np.empty((0, EMBED_DIM), dtype=np.float16)
        self.pool_sha, self.pool_size = [], []
        self.next_shard = 0

    def shard(self, rows: int) -> dict:
        """The next shard: its successes' feature columns and its img2dataset metadata."""
        import numpy as np

        index = self.next_shard
        self.next_shard += 1
        rng = np.random.default_rng([self.seed, index])
        noise = 0.03  # per dimension: cosine ~0.77 to the centre, ~0.59 between two rows of a centre
        centre = rng.choice(CENTRES, size=rows, p=self.popularity)
        image = unit(self.centres[centre] + noise * rng.standard_normal((rows, EMBED_DIM), dtype=np.float32))
        image = image.astype(np.float16)
        sha = [rng.bytes(32).hex() for _ in range(rows)]
        short = np.exp(rng.normal(math.log(480), 0.45, rows)).clip(200, 4000)
        small = rng.random(rows) < 0.02
        short[small] = rng.integers(40, 200, small.sum())
        aspect = np.exp(np.abs(rng.normal(0, 0.3, rows))).clip(1, 2.9)
        extreme = rng.random(rows) < 0.005
        aspect[extreme] = rng.uniform(3.2, 6, extreme.sum())
        wide = rng.random(rows) < 0.6
        width = np.where(wide, short * aspect, short).round().astype(np.int64)
        height = np.where(wide, short, short * aspect).round().astype(np.int64)
        # duplicates: 5% exact (same bytes: sha256, size and embedding), 5% near (re-encoded or cropped)
        kind = rng.random(rows)
        for i in np.flatnonzero(kind < 0.10):
            same_shard = rng.random() < 0.2 or not len(self.pool_sha)
            if same_shard and i == 0:
                continue
            j = int(rng.integers(i)) if same_shard else int(rng.integers(len(self.pool_sha)))
            source = image[j] if same_shard else self.pool_image[j]
            if kind[i] < 0.05:
                image[i] = source
                sha[i] = sha[j] if same_shard else self.pool_sha[j]
                width[i], height[i] = (width[j], height[j]) if same_shard else self.pool_size[j]
            else:
                jitter = 0.15 / math.sqrt(EMBED_DIM) * rng.standard_normal(EMBED_DIM)
                image[i] = unit((source.astype(np.float32) + jitter)[None])[0]
        # text: the image plus noise (cosine ~0.2-0.6) for 90%, unrelated for 10%
        spread = rng.uniform(1.3, 4.9, (rows, 1)).astype(np.float32)
        noise_text = unit(rng.standard_normal((rows, EMBED_DIM), dtype=np.float32))
        text = unit(image.astype(np.float32) + spread * noise_text)
        unrelated = rng.random(rows) < 0.10
        text[unrelated] = noise_text[unrelated]
        u = rng.random(rows)
        kinds = np.select([u < 0.015, u < 0.02, u < 0.07], ["boilerplate", "short", "foreign"], "en")
        captions = [caption(rng, k) for k in kinds]
        self._remember(rng, image, sha, width, height)
        # img2dataset's metadata: every sample of the shard, failed downloads too (they have no feature row)
        total = round(rows / 0.95)
        failed = np.zeros(total, dtype=bool)
        failed[rng.choice(total, total - rows, replace=False)] = True
        keys = [f"{index:05d}{i:05d}" for i in range(total)]
        ok = np.flatnonzero(~failed)
        meta = {"key": keys, "status": ["failed_to_download" if f else "success" for f in failed],
                "url": [f"https://example.com/{index}/{i}.jpg" for i in range(total)],
                "original_width": [None] * total, "original_height": [None] * total, "sha256": [None] * total,
                "error_message": ["timeout" if f else None for f in failed]}
        for row, i in enumerate(ok):
            meta["original_width"][i], meta["original_height"][i] = int(width[row]), int(height[row])
            meta["sha256"][i] = sha[row]
        return {"index": index, "keys": [keys[i] for i in ok], "captions": captions, "image": image,
                "text": text.astype(np.float16), "meta": meta}

    def _remember(self, rng, image, sha, width, height) -> None:
        """A few of this shard's rows join the pool later shards duplicate from (reservoir-like)."""
        import numpy as np

        chosen = rng.choice(len(sha), size=min(len(sha), 2000), replace=False)
        if len(self.pool_sha) + len(chosen) <= RESERVOIR:
            self.pool_image = np.concatenate([self.pool_image, image[chosen]])
            self.pool_sha += [sha[i] for i in chosen]
            self.pool_size += [(width[i], height[i]) for i in chosen]
            return
        slots = rng.choice(RESERVOIR, size=len(chosen), replace=False)
        for slot, i in zip(slots, chosen, strict=True):
            self.pool_image[slot], self.pool_sha[slot], self.pool_size[slot] = image[i], sha[i], (width[i], height[i])


def write_shard(shard: dict, features: Path, shards: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlkd.data.feature_schema import BAD_SAMPLES_KEY, DTYPE, FORMAT, feature_schema, fixed_size_array

    name = f"{shard['index']:05d}"
    metadata = {"made_by": "benchmark", "shard_sha256": "0" * 64, "format": FORMAT, "teacher": TEACHER,
                "preprocess": "Resize(224, bicubic), CenterCrop(224), Normalize(OpenAI)", "image_size": 224,
                "embed_dim": EMBED_DIM, "dtype": DTYPE, "normalized": True, "image_tokens": False,
                "shard": f"{name}.tar"}
    schema = feature_schema(EMBED_DIM, None, metadata)
    table = pa.Table.from_arrays([
        pa.array(shard["keys"], pa.string()), pa.array(shard["captions"], pa.string()),
        pa.array([[c] for c in shard["captions"]], pa.list_(pa.string())),
        fixed_size_array(shard["image"]), fixed_size_array(shard["text"])], schema=schema)
    partial = features / f".{name}.parquet.partial"
    with pq.ParquetWriter(partial, schema) as writer:
        writer.write_table(table, row_group_size=ROW_GROUP)
        writer.add_key_value_metadata({BAD_SAMPLES_KEY: "[]"})
    partial.replace(features / f"{name}.parquet")
    pq.write_table(pa.table(shard["meta"]), shards / f"{name}.parquet")


def make_corpus(folder: Path, rows: int, new_rows: int, file_rows: int) -> tuple[Path, Path, Path]:
    """features/ with `rows` rows, features-new/ with the refresh's `new_rows` (later shards), shards/."""
    features, new, shards = folder / "features", folder / "features-new", folder / "shards"
    for path in (features, new, shards):
        path.mkdir(parents=True, exist_ok=True)
    corpus = Corpus()
    for target, count in ((features, rows), (new, new_rows)):
        for start in range(0, count, file_rows):
            write_shard(corpus.shard(min(file_rows, count - start)), target, shards)
    return features, new, shards


def disk_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


# -- one measurement, in its own process ---------------------------------------------------------------------
def status_mib(field: str) -> float:
    """VmHWM (peak) or VmRSS of this process, MiB. VmHWM rather than getrusage's ru_maxrss, which Linux
    carries over fork + exec (the parent's peak would leak into the child's)."""
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(field + ":"))) / 1024


class Phases:
    """Seconds spent in the stage's functions, by wrapping them (the wrappers cost ~0.5 µs a call)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.peaks: dict[str, float] = {}
        self.index = None

    def wrap(self, owner, attribute: str, phase: str, peak_after: bool = False) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started
                self.calls[phase] = self.calls.get(phase, 0) + 1
                if peak_after:
                    self.peaks[phase] = status_mib("VmHWM")

        setattr(owner, attribute, timed)

    def install(self) -> None:
        import vlkd.filter.rules as rules
        import vlkd.filter.run as run
        import vlkd.filter.state as state
        from vlkd.filter.dedup import SemanticIndex

        self.wrap(run, "files_sha256", "hash files")
        self.wrap(run, "load_or_fit", "state fit", peak_after=True)
        self.wrap(state, "fit_centroids", "k-means")
        self.wrap(run, "read_rows", "read rows")
        self.wrap(run, "filter_rows", "filter rows", peak_after=True)
        self.wrap(rules.RowRules, "reasons", "rules")
        self.wrap(rules, "language", "language")
        self.wrap(SemanticIndex, "assign", "semantic assign")
        self.wrap(SemanticIndex, "deduplicate", "semantic dedup")
        self.wrap(run, "_index_kept", "re-index kept", peak_after=True)
        self.wrap(run, "_write", "write")
        self.wrap(run, "summarize", "summary", peak_after=True)
        self.wrap(run, "write_report", "report", peak_after=True)
        init = SemanticIndex.__init__

        def remember(index, *args, **kwargs):
            init(index, *args, **kwargs)
            self.index = index

        SemanticIndex.__init__ = remember

    def index_stats(self) -> dict:
        if self.index is None:
            return {"index_rows": 0, "index_mib": 0.0}
        nbytes = sum(part.nbytes for parts in self.index.embeddings.values() for part in parts)
        sizes = sorted((len(ids) for ids in self.index.ids.values()), reverse=True)
        return {"index_rows": self.index.rows, "index_mib": nbytes / 2**20, "largest_cluster": sizes[0] if sizes else 0}


def run_measurement(args) -> dict:
    import logging

    logging.basicConfig(level=logging.WARNING)
    from vlkd.config.filter import FilterParams
    from vlkd.filter.run import filter_corpus

    phases = Phases()
    phases.install()
    import faiss  # noqa: F401  imported by the fit; counted in the baseline RSS as the stage's own import

    from vlkd.filter.rules import language

    language("warm up the language model")  # its load is an import-time cost, not per-row
    rss_ready = status_mib("VmRSS")
    overrides = dict(VARIANTS[args._measure][0])
    params = FilterParams(features=args.features, shards=args.shards, output=args.output, clip_score_min=None,
                          clip_score_top=0.7, **overrides)
    phases.seconds.clear()
    phases.calls.clear()
    started = time.perf_counter()
    if args.profile:
        profiler = cProfile.Profile()
        summary = profiler.runcall(filter_corpus, params)
        profiler.dump_stats(args.profile)
    else:
        summary = filter_corpus(params)
    seconds = time.perf_counter() - started
    import ctypes

    import pyarrow as pa

    rss_end = status_mib("VmRSS")
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # after the measurement: how much of the end RSS is freed heap
    return {"rss_end_mib": rss_end, "rss_trimmed_mib": status_mib("VmRSS"),
            "arrow_peak_mib": pa.default_memory_pool().max_memory() / 2**20,
            "seconds": seconds, "rows": summary["rows"], "kept": summary["kept"], "dropped": summary["dropped"],
            "threshold": summary["clip_score"]["threshold"], "clusters": summary["semdedup"]["clusters"],
            "sampled_rows": summary["semdedup"]["sampled_rows"], "this_run": summary["this_run"],
            "phases": phases.seconds, "calls": phases.calls, "peaks": phases.peaks,
            "rss_ready_mib": rss_ready, "peak_mib": status_mib("VmHWM"), **phases.index_stats()}


def snapshot_code(folder: Path, source: str) -> tuple[Path, str]:
    """A copy of the vlkd package that every measurement imports, and what it is: a file's outputs record the
    code that made them, so an edit of the working tree between the first run and the refresh would make the
    refresh filter every file again (and the runs would not measure the same code). `source` "head": the
    committed package (git archive HEAD); "worktree": the working tree as it is now."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    folder.mkdir(parents=True)
    if source == "head":
        archive = subprocess.run(["git", "archive", "--format=tar", "HEAD", "vlkd"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        return folder, f"commit {commit}"
    shutil.copytree(ROOT / "vlkd", folder / "vlkd", ignore=shutil.ignore_patterns("__pycache__"))
    return folder, f"commit {commit} plus the working tree"


def measure(variant: str, features: Path, shards: Path, output: Path, hash_cache: Path, code: Path,
            profile: Path | None = None, timeout: float = 3600) -> dict:
    """`filter_corpus` in a fresh process; its peak RSS is its own."""
    command = [sys.executable, __file__, "--_measure", variant, "--features", str(features), "--shards",
               str(shards), "--output", str(output)]
    if profile is not None:
        command += ["--profile", str(profile)]
    env = {**os.environ, "VLKD_HASH_CACHE": str(hash_cache), "TQDM_DISABLE": "1", "PYTHONPATH": str(code),
           **VARIANTS[variant][1]}
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        sys.exit(f"{variant} measurement ran past {timeout} s:\n{str(err.stderr or '')[-4000:]}")
    if result.returncode != 0:
        sys.exit(f"{variant} measurement failed:\n{result.stderr[-4000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    measured["wall"] = time.perf_counter() - started  # with the process's start and imports
    measured["output_mib"] = disk_mib(output)
    print(f"  {variant}: {measured['seconds']:.1f} s, peak {measured['peak_mib']:.0f} MiB", flush=True)
    return measured


# -- the report ----------------------------------------------------------------------------------------------
PHASE_COLUMNS = ["hash files", "state fit", "k-means", "read rows", "rules", "language", "semantic assign",
                 "semantic dedup", "write", "re-index kept", "summary", "report"]


def main_table(results: list[tuple[int, str, dict]]) -> str:
    lines = ["| N | run | rows filtered | seconds | rows/s | peak RSS MiB | RSS after imports MiB | "
             "peak after state fit / file loop MiB | kept | semantic index rows | index MiB |",
             "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for n, name, r in results:
        filtered = r["this_run"]["rows_filtered"]
        loop_peak = max(r["peaks"].get("filter rows", 0), r["peaks"].get("re-index kept", 0))
        lines.append(
            f"| {n:,} | {name} | {filtered:,} | {r['seconds']:.1f} | {filtered / r['seconds']:,.0f} | "
            f"{r['peak_mib']:,.0f} | {r['rss_ready_mib']:,.0f} | {r['peaks'].get('state fit', 0):,.0f} / "
            f"{loop_peak:,.0f} | {r['kept']:,} | {r['index_rows']:,} | {r['index_mib']:,.0f} |")
    return "\n".join(lines)


def memory_table(results: list[tuple[int, str, dict]]) -> str:
    lines = ["| N | run | peak RSS MiB | RSS at the end MiB | after malloc_trim MiB | Arrow pool peak MiB | "
             "semantic index MiB | largest cluster (kept rows) | output on disk MiB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n, name, r in results:
        lines.append(f"| {n:,} | {name} | {r['peak_mib']:,.0f} | {r['rss_end_mib']:,.0f} | "
                     f"{r['rss_trimmed_mib']:,.0f} | {r['arrow_peak_mib']:,.0f} | {r['index_mib']:,.0f} | "
                     f"{r.get('largest_cluster', 0):,} | {r['output_mib']:,.1f} |")
    return "\n".join(lines)


def phase_table(results: list[tuple[int, str, dict]]) -> str:
    header = " | ".join(PHASE_COLUMNS)
    lines = [f"| N | run | {header} | exact dedup + tables | other | total |",
             "|---:|---|" + "---:|" * (len(PHASE_COLUMNS) + 3)]
    for n, name, r in results:
        p = r["phases"]
        inside = p.get("filter rows", 0) - p.get("rules", 0) - p.get("semantic assign", 0) - p.get("semantic dedup", 0)
        top = sum(p.get(k, 0) for k in ("hash files", "state fit", "read rows", "filter rows", "write",
                                           "re-index kept", "summary", "report"))
        cells = " | ".join(f"{p.get(k, 0):.1f}" for k in PHASE_COLUMNS)
        lines.append(f"| {n:,} | {name} | {cells} | {inside:.1f} | {r['seconds'] - top:.1f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def dropped_table(results: list[tuple[int, str, dict]]) -> str:
    reasons = list(results[0][2]["dropped"])
    lines = ["| N | run | rows | kept | " + " | ".join(reasons) + " |", "|---:|---|" + "---:|" * (len(reasons) + 2)]
    for n, name, r in results:
        lines.append(f"| {n:,} | {name} | {r['rows']:,} | {r['kept']:,} | "
                     + " | ".join(f"{r['dropped'][k]:,}" for k in reasons) + " |")
    return "\n".join(lines)


def growth_lines(by_n: dict[int, dict[str, dict]]) -> str:
    sizes = sorted(by_n)
    out = []
    for n in sizes:
        r = by_n[n]["recipe"]
        p = r["phases"]
        refresh = by_n[n]["refresh"]["phases"]
        out.append(f"N={n:,}: semantic dedup {p.get('semantic dedup', 0):.1f} s "
                   f"({1e6 * p.get('semantic dedup', 0) / n:.1f} µs/row), k-means {p.get('k-means', 0):.1f} s on "
                   f"{r['sampled_rows']:,} sampled rows, largest cluster {r.get('largest_cluster', 0):,} kept rows; "
                   f"the refresh's re-index of earlier kept rows {refresh.get('re-index kept', 0):.1f} s, its "
                   f"semantic dedup of {by_n[n]['refresh']['this_run']['rows_filtered']:,} new rows "
                   f"{refresh.get('semantic dedup', 0):.1f} s")
    for small, large in zip(sizes, sizes[1:], strict=False):
        a, b = by_n[small]["recipe"]["phases"], by_n[large]["recipe"]["phases"]
        for phase in ("semantic dedup", "read rows", "rules"):
            if a.get(phase) and b.get(phase):
                exponent = math.log(b[phase] / a[phase]) / math.log(large / small)
                out.append(f"{phase}: x{b[phase] / a[phase]:.1f} for x{large / small:.0f} rows "
                           f"(time ~ rows^{exponent:.2f})")
    return "\n".join(out)


def print_profile(path: Path, top: int = 30) -> None:
    stream = io.StringIO()
    stats = pstats.Stats(str(path), stream=stream)
    stats.sort_stats("cumulative").print_stats(top)
    print("```")
    print("\n".join(line for line in stream.getvalue().splitlines() if line.strip())[:12000])
    print("```")


def read_seconds(path: Path, folder: Path) -> tuple[float, float]:
    """Seconds to read one feature file's image_embedding column as the features stage writes it (Parquet's
    defaults: dictionary encoding, which float16 values fill and fall back from) and re-written without a
    dictionary; the best of three."""
    import pyarrow.parquet as pq

    plain = folder / "plain.parquet"
    pq.write_table(pq.read_table(path), plain, row_group_size=ROW_GROUP, use_dictionary=False)
    best = []
    for source in (path, plain):
        times = []
        for _ in range(3):
            started = time.perf_counter()
            pq.read_table(source, columns=["image_embedding"])
            times.append(time.perf_counter() - started)
        best.append(min(times))
    plain.unlink()
    return best[0], best[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="corpus sizes")
    parser.add_argument("--file-rows", type=int, default=10_000, help="rows per feature file (per shard)")
    parser.add_argument("--refresh-share", type=float, default=0.05, help="new rows of the refresh, a share of N")
    parser.add_argument("--profile-rows", type=int, default=None,
                        help="also run the recipe at this N (one of --rows) once more under cProfile")
    parser.add_argument("--skip-baselines", action="store_true", help="no runs without semdedup or language")
    parser.add_argument("--workdir", type=Path, help="corpora and outputs here (default: a temp folder)")
    parser.add_argument("--code", choices=["head", "worktree"], default="head",
                        help="measure the committed vlkd (default) or the working tree as it is at the start")
    parser.add_argument("--keep-data", action="store_true", help="keep each N's corpus and outputs (in --workdir)")
    parser.add_argument("--_measure", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--features", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args._measure:
        print(json.dumps(run_measurement(args)))
        return
    results: list[tuple[int, str, dict]] = []
    by_n: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        code, commit = snapshot_code(Path(tmp) / "code", args.code)
        reads = None
        for n in args.rows:
            folder = Path(tmp) / f"n{n}"
            new_rows = round(n * args.refresh_share)
            started = time.perf_counter()
            features, new, shards = make_corpus(folder, n, new_rows, args.file_rows)
            print(f"N={n:,}: corpus written in {time.perf_counter() - started:.0f} s "
                  f"({disk_mib(folder):,.0f} MiB on disk)", flush=True)
            reads = reads or read_seconds(min(features.glob("*.parquet")), folder)
            by_n[n] = {}
            variants = ["recipe", "recipe, 1 BLAS thread"] if args.skip_baselines else list(VARIANTS)
            for variant in variants:
                slug = "".join(c for c in variant if c.isalnum())
                by_n[n][variant] = measure(variant, features, shards, folder / f"out-{slug}",
                                           folder / f"hashes-{slug}.sqlite", code)
                results.append((n, variant, by_n[n][variant]))
            first_files = sorted(path.name for path in features.glob("*.parquet"))
            for path in sorted(new.glob("*.parquet")):
                path.rename(features / path.name)
            name = f"refresh +{100 * args.refresh_share:g}%"
            by_n[n]["refresh"] = measure("recipe", features, shards, folder / "out-recipe",
                                         folder / "hashes-recipe.sqlite", code)
            new_files = len(list(features.glob("*.parquet"))) - len(first_files)
            if by_n[n]["refresh"]["this_run"]["files_filtered"] != new_files:
                print(f"  WARNING: the refresh filtered {by_n[n]['refresh']['this_run']['files_filtered']} files, "
                      f"not the {new_files} new ones", flush=True)
            results.append((n, name, by_n[n]["refresh"]))
            if args.profile_rows == n:
                profile_features = folder / "features-profile"  # the first run's files only
                profile_features.mkdir()
                for name in first_files:
                    (profile_features / name).symlink_to(features / name)
                by_n[n]["profile"] = measure("recipe", profile_features, shards, folder / "out-profile",
                                             folder / "hashes-profile.sqlite", code, profile=folder / "recipe.prof")
                shutil.copy(folder / "recipe.prof", Path(tmp) / f"recipe-{n}.prof")
            if args.keep_data and args.workdir:
                shutil.copytree(folder, args.workdir / f"filter-bench-n{n}", dirs_exist_ok=True)
            shutil.rmtree(folder)
        print(f"\nfilter stage, synthetic ViT-L-14 rows (768-d float16), {platform.machine()} with "
              f"{os.cpu_count()} CPU cores, files of {args.file_rows:,} rows; clip_score_top 0.7 in place of "
              "clip_score_min 0.28 (synthetic cosines are not on a real teacher's scale), otherwise FilterParams' "
              f"defaults (semdedup_clusters 1000, eps 0.05, languages [en]); vlkd as of {commit}, copied at the "
              "start\n")
        print(main_table(results))
        print("\nmemory: the end of the run, what glibc gives back when asked (freed heap it kept), Arrow's own "
              "allocations\n")
        print(memory_table(results))
        print("\nseconds by phase (state fit includes k-means; rules include language; 'other': opening the "
              "store, the code fingerprint, listing files)\n")
        print(phase_table(results))
        print("\nrows dropped, by reason\n")
        print(dropped_table(results))
        print()
        print(growth_lines(by_n))
        print(f"reading one feature file's image_embedding column ({args.file_rows:,} rows): {reads[0]:.3f} s as "
              f"written (dictionary-encoded float16), {reads[1]:.3f} s without a dictionary")
        if args.profile_rows in by_n and "profile" in by_n[args.profile_rows]:
            r = by_n[args.profile_rows]["profile"]
            print(f"\ncProfile of the recipe's first run at N={args.profile_rows:,} ({r['seconds']:.1f} s under the "
                  "profiler), top functions by cumulative time:\n")
            print_profile(Path(tmp) / f"recipe-{args.profile_rows}.prof")


if __name__ == "__main__":
    main()
