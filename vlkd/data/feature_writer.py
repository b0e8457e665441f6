"""Feature files: a frozen teacher's embeddings of every shard, one Parquet file per shard (the contract in
`feature_schema`). The features stage runs this on the corpus, evaluation on its images.

    pending shards (not done for this teacher) -> DataLoader workers decode + tokenize, whole batches
    of one shard each -> teacher forward (autocast on GPU) -> streamed row groups -> atomic rename

clip-retrieval's `inference` does the same job but writes .npy files, holds a partition in memory and
cannot resume; here memory is bounded by a batch, a killed run leaves whole files or none, and a shard
whose file exists for the same teacher is skipped, so a corpus refresh only computes the new shards.
Several processes split the shard list deterministically (rank i of n takes every n-th shard); whichever
finds the folder complete when it finishes writes its summary, so no rank waits for another.

A shard that cannot be read to its end (`UnreadableShard`: cut short, not a tar) gets no feature file, so it
is never done and every run tries it again: once it is whole, it is embedded. Its rows already encoded are
dropped with the partial file; its owner leaves `NNNNN.unreadable.json` (the shard's sha256 and the problem),
so whichever rank writes the summary names it, and the folder counts as complete without it.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from vlkd.data.feature_schema import (
    BAD_SAMPLES_KEY,
    DTYPE,
    FORMAT,
    feature_schema,
    fixed_size_array,
    read_bad_samples,
    read_metadata,
)
from vlkd.data.feature_store import FEATURE_FILES
from vlkd.data.webdataset import ShardSpec, UnreadableShard, iter_shard, list_shards, warn_unreadable
from vlkd.errors import VlkdError
from vlkd.io import write_json_atomic
from vlkd.record import files_sha256, fingerprint, library_versions, stage_code
from vlkd.training import autocast, resolve_device, resolve_precision, worker_context

if TYPE_CHECKING:  # the type only: data/ never runs models/ (the teacher is handed in)
    from vlkd.models.teacher import Teacher

log = logging.getLogger(__name__)

MAX_LISTED_BAD_KEYS = 10_000


@dataclass
class ShardBatch:
    """Up to batch_size decoded samples of one shard; `last` marks the shard's final batch."""

    shard: Path
    keys: list[str]
    captions: list[str]
    all_captions: list[tuple[str, ...]]  # every caption of each sample, its `captions` first
    images: torch.Tensor  # [n, 3, H, W]
    tokens: torch.Tensor  # [n, context_length]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of undecodable samples
    last: bool = False
    unreadable: UnreadableShard | None = None  # the shard's last batch, empty: it cannot be read to its end

    def pin_memory(self) -> ShardBatch:  # called by DataLoader(pin_memory=True)
        self.images, self.tokens = self.images.pin_memory(), self.tokens.pin_memory()
        return self


class ShardBatches(IterableDataset):
    """Decodes shards in DataLoader workers; worker w takes shards w, w + workers, ... so batches never
    mix shards and each shard's rows keep their order."""

    def __init__(self, tars: list[Path], preprocess: Callable, tokenizer: Callable, batch_size: int):
        self.tars, self.preprocess, self.tokenizer, self.batch_size = tars, preprocess, tokenizer, batch_size

    def __iter__(self) -> Iterator[ShardBatch]:
        worker = get_worker_info()
        mine = self.tars if worker is None else self.tars[worker.id :: worker.num_workers]
        for tar in mine:
            yield from self._shard_batches(tar)

    def _shard_batches(self, tar: Path) -> Iterator[ShardBatch]:
        keys, captions, all_captions, images, bad = [], [], [], [], []
        try:
            for sample in iter_shard(tar):
                try:
                    if sample.image is None:
                        raise ValueError("no image in the shard for this key")
                    images.append(self.preprocess(Image.open(io.BytesIO(sample.image))))
                except Exception as err:  # noqa: BLE001 (any decoder error means: skip this sample, keep its key)
                    bad.append((sample.key, f"{type(err).__name__}: {err}"[:200]))
                    continue
                keys.append(sample.key)
                captions.append(sample.caption)
                all_captions.append(sample.captions)
                if len(keys) == self.batch_size:
                    yield self._batch(tar, keys, captions, all_captions, images, bad, last=False)
                    keys, captions, all_captions, images, bad = [], [], [], [], []
        except UnreadableShard as err:  # an outcome, not a worker's traceback: the other shards go on
            yield self._batch(tar, [], [], [], [], [], last=True, unreadable=err)
            return
        yield self._batch(tar, keys, captions, all_captions, images, bad, last=True)

    def _batch(self, tar, keys, captions, all_captions, images, bad, last, unreadable=None) -> ShardBatch:
        return ShardBatch(
            shard=tar, keys=keys, captions=captions, all_captions=all_captions, bad=bad, last=last,
            unreadable=unreadable,
            images=torch.stack(images) if images else torch.empty(0),
            tokens=self.tokenizer(captions) if captions else torch.empty(0, dtype=torch.long),
        )


class ShardWriter:
    """Streams one shard's rows into a hidden partial file and renames it into place when complete."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = path, schema
        self.partial = partial_path(path)
        self.writer = pq.ParquetWriter(self.partial, schema)
        self.rows = 0

    def write(self, keys: list[str], captions: list[str], all_captions: list[tuple[str, ...]], image: np.ndarray,
              text: np.ndarray, tokens: np.ndarray | None) -> None:
        if not keys:
            return
        columns = [pa.array(keys, pa.string()), pa.array(captions, pa.string()),
                   pa.array([list(texts) for texts in all_captions], pa.list_(pa.string())),
                   fixed_size_array(image), fixed_size_array(text)]
        if tokens is not None:
            columns.append(fixed_size_array(tokens))
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self.rows += len(keys)

    def commit(self, bad: list[tuple[str, str]]) -> None:
        """Close the file with its shard's undecodable samples in the footer, and rename it into place."""
        self.writer.add_key_value_metadata({BAD_SAMPLES_KEY: json.dumps(bad)})
        self.writer.close()
        self.partial.replace(self.path)

    def discard(self) -> None:
        self.writer.close()
        self.partial.unlink()


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def output_path(output: Path, tar: Path) -> Path:
    return output / f"{tar.stem}.parquet"


def unreadable_path(output: Path, tar: Path) -> Path:
    return output / f"{tar.stem}.unreadable.json"


@dataclass(frozen=True)
class Encoding:
    """How the teacher embeds the shards (the features stage's settings, features.* in params.yaml)."""

    batch_size: int
    num_workers: int  # DataLoader processes decoding images
    device: str  # auto, cpu or cuda
    precision: str  # auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16
    image_tokens: bool  # also store the image tokens (ViT patches or ResNet cells)


def extract_features(shards: ShardSpec, output: Path, teacher: Teacher, encoding: Encoding,
                     rank: int = 0, world_size: int = 1, replace_other_teachers: bool = False) -> dict:
    """Bring `output` up to date with the shards `shards` names (a folder, a brace pattern, tar files: see
    `list_shards`); returns the folder's summary once every shard is done (always, with one process),
    else this rank's. Files made by another teacher are refused, or with `replace_other_teachers` deleted
    (DVC runs: a changed teacher must re-embed everything, and DVC's cache still holds the old files).
    A shard is done when its file was made by this teacher from the shard's present bytes by the same
    code (this module and what it imports), libraries and encoding settings: the per-file form of a stage's record
    (`vlkd.record`). Whoever calls it (the features stage, evaluate's image cache, a benchmark), the same
    shard gives the same file. A shard that cannot be read to its end gets none and is named in the summary
    (`unreadable_shards`); the other shards are embedded."""
    started = time.perf_counter()
    tars = list_shards(shards)
    if not tars:
        raise VlkdError(f"no shards in {shards}: a folder needs *.tar files (in a download's folder, complete ones "
                        "with their _stats.json); run `vlkd download` first or check --shards")
    output.mkdir(parents=True, exist_ok=True)
    fingerprint = teacher.fingerprint.as_dict()
    made_by = _made_by(encoding)
    shard_sha256 = dict(zip(tars, files_sha256(tars), strict=True))
    mine = tars[rank::world_size]
    _refuse_other_teachers(output, fingerprint, _deletable(output, tars, mine, rank) if replace_other_teachers
                           else None)
    for tar in mine:  # partial files of a killed run; only this rank ever writes these shards
        partial_path(output_path(output, tar)).unlink(missing_ok=True)

    def done(tar: Path) -> bool:
        return _is_done(output_path(output, tar), fingerprint, made_by, shard_sha256[tar])

    todo = [tar for tar in mine if not done(tar)]
    log.info("features: %d shard(s) for rank %d of %d, %d already done", len(mine), rank, world_size,
             len(mine) - len(todo))
    device = resolve_device(encoding.device, "features.device")
    encoded, bad, unreadable_now = (_encode_shards(todo, output, teacher, encoding, device, made_by, shard_sha256)
                                    if todo else (0, [], 0))
    seconds = time.perf_counter() - started
    # Another rank may still be writing its shards; the last to finish sees them all (each looks after its own
    # files are in place or its unreadable shards written down), and ranks that finish together write the same bytes.
    finished = {tar: done(tar) for tar in tars}
    unreadable = {tar: problem for tar in tars if not finished[tar]
                  and (problem := _unreadable_problem(output, tar, shard_sha256[tar])) is not None}
    complete = all(finished[tar] or tar in unreadable for tar in tars)

    def summary_of(scope: list[Path], *rank_of: int) -> dict:
        return _summary(fingerprint, encoding, device, [output_path(output, tar) for tar in scope if finished[tar]],
                        {tar.name: unreadable[tar] for tar in scope if tar in unreadable}, len(tars), *rank_of)

    if complete:
        summary = summary_of(tars)
        write_json_atomic(output / SUMMARY, summary)
    else:
        summary = summary_of(mine, rank, world_size)
        log.info("rank %d of %d done; %s is written by the rank that finishes last", rank, world_size, SUMMARY)
    if bad:
        log.warning("%d undecodable sample(s) skipped, e.g. %s (%s); their keys are in %s", len(bad), bad[0][0],
                    bad[0][1], output / SUMMARY)
    summary["this_run"] = {
        "rank": rank, "world_size": world_size, "folder_complete": complete,
        "shards_computed": len(todo) - unreadable_now, "shards_unreadable": unreadable_now,
        "shards_skipped": len(mine) - len(todo), "images_encoded": encoded,
        "seconds": round(seconds, 3), "images_per_second": round(encoded / seconds, 2) if encoded else 0.0,
    }
    return summary


SUMMARY = "summary.json"


def _summary(fingerprint: dict, encoding: Encoding, device: torch.device, files: list[Path],
             unreadable: dict[str, str], total_shards: int, rank: int = 0, world_size: int = 1) -> dict:
    """What the feature files hold and which shards could not be read (tar name -> problem), whichever run
    wrote them (a refresh summarises the same as a full run). The folder's summary is the one a single
    process (rank 0 of 1) writes, however many ranks made it, so the same shards give the same bytes; the
    device is its kind only, as ranks differ in their GPU index."""
    bad = [pair for path in files for pair in read_bad_samples(path)]
    return {
        "teacher": fingerprint,
        "rank": rank, "world_size": world_size, "device": device.type,
        "precision": resolve_precision(encoding.precision, device),
        "shards": {"total": total_shards, "this_rank": len(files) + len(unreadable)},
        "images": sum(pq.read_metadata(path).num_rows for path in files),
        "bad_samples": {"count": len(bad), "keys": [key for key, _ in bad[:MAX_LISTED_BAD_KEYS]],
                        "reasons": dict(bad[:20])},
        "unreadable_shards": {"count": len(unreadable), "reasons": unreadable},
    }


def _encode_shards(todo: list[Path], output: Path, teacher: Teacher, encoding: Encoding, device: torch.device,
                   made_by: str, shard_sha256: dict[Path, str]) -> tuple[int, list[tuple[str, str]], int]:
    """Embed `todo`; returns (images encoded, undecodable samples of the files written, unreadable shards)."""
    dataset = ShardBatches(todo, teacher.preprocess, teacher.tokenizer, encoding.batch_size)
    workers = min(encoding.num_workers, len(todo))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=2 if workers else None, persistent_workers=False,
                        multiprocessing_context=worker_context(dataset, workers))
    model = teacher.model.to(device)
    writers: dict[Path, ShardWriter] = {}
    bad: list[tuple[str, str]] = []
    bad_in: dict[Path, list[tuple[str, str]]] = {}
    encoded = unreadable = 0
    with tqdm(total=len(todo), desc="features", unit="shard") as bar:
        for batch in loader:
            if batch.unreadable is not None:
                _skip_unreadable(batch.unreadable, writers.pop(batch.shard, None), output, shard_sha256[batch.shard])
                bad_in.pop(batch.shard, None)
                unreadable += 1
                bar.update()
                continue
            writer = writers.get(batch.shard)
            if writer is None:
                writer = writers[batch.shard] = ShardWriter(
                    output_path(output, batch.shard),
                    feature_schema(teacher.embed_dim, _token_shape(model, teacher) if encoding.image_tokens
                                   else None, _metadata(teacher, encoding, batch.shard, made_by,
                                                        shard_sha256[batch.shard])))
            if batch.keys:
                image, text, tokens = _encode(model, batch, device, encoding)
                writer.write(batch.keys, batch.captions, batch.all_captions, image, text, tokens)
                encoded += len(batch.keys)
            bad_in.setdefault(batch.shard, []).extend(batch.bad)
            if batch.last:
                bad.extend(bad_in[batch.shard])
                unreadable_path(output, batch.shard).unlink(missing_ok=True)  # before the file: never both
                writers.pop(batch.shard).commit(bad_in.pop(batch.shard))
                bar.update()
    return encoded, bad, unreadable


def _skip_unreadable(err: UnreadableShard, writer: ShardWriter | None, output: Path, shard_sha256: str) -> None:
    """No feature file for a shard that cannot be read to its end (its rows so far go with the partial file),
    and the problem written down for whichever rank writes the summary."""
    if writer is not None:
        writer.discard()
    warn_unreadable(err)
    write_json_atomic(unreadable_path(output, err.path),
                      {"shard": err.path.name, "shard_sha256": shard_sha256, "problem": err.problem})


def _unreadable_problem(output: Path, tar: Path, shard_sha256: str) -> str | None:
    """The problem its owner found in the shard's present bytes, or None (not found unreadable, or since changed)."""
    path = unreadable_path(output, tar)
    record = json.loads(path.read_text()) if path.is_file() else {}
    return record.get("problem") if record.get("shard_sha256") == shard_sha256 else None


@torch.inference_mode()
def _encode(model: torch.nn.Module, batch: ShardBatch, device: torch.device, encoding: Encoding):
    images = batch.images.to(device, non_blocking=True)
    tokens = batch.tokens.to(device, non_blocking=True)
    with autocast(device, resolve_precision(encoding.precision, device)):
        image_out = model.encode_image(images)
        text = model.encode_text(tokens)
    pooled, patch = image_out if isinstance(image_out, tuple) else (image_out, None)
    image = F.normalize(pooled.float(), dim=-1).cpu().numpy()
    text = F.normalize(text.float(), dim=-1).cpu().numpy()
    patch = patch.float().cpu().numpy() if patch is not None and encoding.image_tokens else None
    return image, text, patch


def _token_shape(model: torch.nn.Module, teacher: Teacher) -> tuple[int, int]:
    with torch.inference_mode():
        probe = torch.zeros(1, 3, teacher.image_size, teacher.image_size, device=next(model.parameters()).device)
        _, tokens = model.encode_image(probe)
    return tuple(tokens.shape[1:])


def _made_by(encoding: Encoding) -> str:
    """The code, libraries and settings a feature file is made by (with its teacher and shard, its record).
    How many processes decode is left out: the same bytes either way."""
    shaping = {key: value for key, value in asdict(encoding).items() if key != "num_workers"}
    return fingerprint({"code": stage_code([__name__]), "libraries": library_versions(), "encoding": shaping})


def _metadata(teacher: Teacher, encoding: Encoding, tar: Path, made_by: str, shard_sha256: str) -> dict:
    return {
        "made_by": made_by,
        "shard_sha256": shard_sha256,
        "format": FORMAT,
        "teacher": teacher.fingerprint.as_dict(),
        "preprocess": teacher.preprocess_description,
        "image_size": teacher.image_size,
        "embed_dim": teacher.embed_dim,
        "dtype": DTYPE,
        "normalized": True,
        "image_tokens": encoding.image_tokens,
        "shard": tar.name,
    }


def _deletable(output: Path, tars: list[Path], mine: list[Path], rank: int) -> set[str]:
    """The feature files this rank may delete: its own shards', and (rank 0) those of no shard. Only a
    shard's owner touches its file, so one rank never deletes a file another has just written."""
    names = {output_path(output, tar).name for tar in mine}
    if rank == 0:
        names |= {path.name for path in output.glob(FEATURE_FILES)} - {output_path(output, tar).name for tar in tars}
    return names


def _refuse_other_teachers(output: Path, fingerprint: dict, deletable: set[str] | None = None) -> None:
    """Stop at a file made by another teacher, or delete it if it is in `deletable` (None: refuse them
    all); another rank's are left to that rank."""
    for path in sorted(output.glob(FEATURE_FILES)):
        metadata = read_metadata(path)
        theirs = metadata and metadata.get("teacher")
        if theirs == fingerprint:
            continue
        if deletable is not None and path.name in deletable:
            log.warning("deleting %s: made by another teacher (--replace-other-teachers)", path)
            path.unlink()
        elif deletable is None:
            raise VlkdError(
                f"features in {output} were made by another teacher ({path.name}: "
                f"{(theirs or {}).get('model', 'unknown')}, weights {str((theirs or {}).get('weights_sha256'))[:12]}) "
                f"than this one ({fingerprint['model']}, weights {fingerprint['weights_sha256'][:12]}); "
                "use another --output or delete that folder")


def _is_done(path: Path, fingerprint: dict, made_by: str, shard_sha256: str) -> bool:
    """Whether `path` is this run's file: a file made otherwise (with or without image tokens among the
    settings) is made again, so the folder's bytes are what a fresh run would write."""
    if not path.is_file():
        return False
    metadata = read_metadata(path)  # None: not a feature file
    return (metadata is not None and metadata["teacher"] == fingerprint and metadata.get("made_by") == made_by
            and metadata.get("shard_sha256") == shard_sha256)
