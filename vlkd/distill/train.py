"""`vlkd distill`: VLKD from stored teacher features into the language model (the VLKD paper, arXiv 2203.06386).

One process, or one per GPU/CPU under `torchrun` (DistributedDataParallel; gloo on CPU, nccl on CUDA).
All randomness of optimizer step s on rank r (dropout, span masking) is drawn from seeds made of
(seed, rank, s), and the data order from (seed, epoch), so a run resumed from a checkpoint takes
exactly the steps an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlkd.config import DistillParams
from vlkd.data.feature_store import FeatureStore
from vlkd.distill.data import FeatureBatches
from vlkd.distill.reading import CaptionReading
from vlkd.distill.retention import RetentionBatches
from vlkd.distill.rows import ROWS_SEEN, RowSelection, continuation_rows, read_rows_seen, rows_seen_record
from vlkd.errors import VlkdError
from vlkd.io import building_folder, write_json_atomic
from vlkd.models.language_model import MANIFEST as PLM_MANIFEST
from vlkd.models.language_model import language_model_text, read_manifest
from vlkd.models.losses import ItclLoss, noisy_batch, reading_loss, ttdm_loss
from vlkd.models.student import STUDENT_CONFIG, Student, StudentConfig, load_language_model
from vlkd.models.teacher import check_teacher
from vlkd.record import StageRecord, fingerprint
from vlkd.training import (
    Checkpoint,
    EpochMeans,
    Optimization,
    autocast,
    progress,
    resolve_device,
    resolve_precision,
    trainable,
)

logger = logging.getLogger(__name__)

LOSSES = ("ttdm", "itcl", "icti", "retention", "reading")
CHECKPOINT = "last.pt"
METRICS = "distill-metrics.json"
# Params that do not change what is computed: a checkpoint made with other values still resumes.
_NOT_IN_FINGERPRINT = {"output", "checkpoints", "plots", "checkpoint_every", "device", "compile"}


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distill(params: DistillParams) -> dict:
    """Train the student and write it to `params.output`; returns the stage's metrics."""
    ranks = _init_distributed(params.device)
    try:
        return _distill(params, ranks)
    finally:
        if ranks.world_size > 1:
            dist.destroy_process_group()


class VlkdObjective(nn.Module):
    """The weighted sum of TTDM, ITCL and ICTI (and retention and caption reading, when on) for one batch;
    the module DDP wraps."""

    def __init__(self, student: Student, params: DistillParams, ranks: Ranks):
        super().__init__()
        self.student, self.params = student, params
        self.itcl = ItclLoss(ranks.rank, ranks.world_size)

    def forward(self, text_ids, text_mask, noisy_ids, noisy_mask, labels, prefix_features, image_embedding,
                text_embedding, retention=None, reading=None) -> dict[str, torch.Tensor]:
        p, losses = self.params, {}
        if p.ttdm_weight or p.itcl_weight:
            student_text = self.student.text_embedding(text_ids, text_mask)
            if p.ttdm_weight:
                losses["ttdm"] = ttdm_loss(student_text, text_embedding, p.ttdm_distance)
            if p.itcl_weight:
                losses["itcl"] = self.itcl(image_embedding, student_text, self.student.logit_scale)
        if p.icti_weight:
            losses["icti"] = self.student.infilling_loss(noisy_ids, noisy_mask, labels, prefix_features)
        if retention is not None:
            losses["retention"] = self.student.infilling_loss(retention["input_ids"], retention["attention_mask"],
                                                              retention["labels"], None)
        if reading is not None:
            logits = self.student.decoder_logits(reading["input_ids"], reading["attention_mask"],
                                                 reading["decoder_input_ids"], prefix_features)
            losses["reading"] = reading_loss(logits, reading["copy_labels"], reading["answer_position"],
                                             reading["answer_mask"], reading["target"])
        weights = {"ttdm": p.ttdm_weight, "itcl": p.itcl_weight, "icti": p.icti_weight,
                   "retention": p.retention_weight, "reading": p.reading_weight}
        losses["loss"] = sum(weights[name] * value for name, value in losses.items())
        return losses


def _distill(params: DistillParams, ranks: Ranks) -> dict:
    if not (params.ttdm_weight or params.itcl_weight or params.icti_weight):
        raise VlkdError("distill.ttdm_weight, itcl_weight and icti_weight are all 0; set at least one above 0")
    store = FeatureStore(params.features)
    record = StageRecord.of("distill", __name__, params, stage_inputs(params), params.output / STUDENT_CONFIG)
    if record.reusable(params.output):
        logger.info("student in %s is up to date with its record; not trained again", params.output)
        return {**json.loads((params.output / METRICS).read_text()), "this_run": {"reused": True}}
    columns = _needed_columns(params, store)
    init = _init_folder(params.init)
    file_rows, seen = _file_rows(store), None if init is None else read_rows_seen(init)
    torch.manual_seed(params.seed)  # the new projections' initial weights: the same on every rank and run
    student = _build_student(params, store, init).to(ranks.device)
    student.train()
    selection = _row_selection(params, file_rows, seen, init)
    if selection is not None and selection.new == 0:
        return _nothing_new(student, params, store, init, rows_seen_record(file_rows, seen), ranks, record)
    batches = FeatureBatches(store, columns, params.batch_size, params.seed, ranks.rank, ranks.world_size,
                             rows=None if selection is None else selection.rows)
    retention = _retention_batches(params, student)
    reading = _caption_reading(params, student, ranks.device)
    steps_per_epoch = batches.steps_per_epoch // params.grad_accum
    if steps_per_epoch == 0:
        raise VlkdError(f"{batches.steps_per_epoch} batches per epoch make no optimizer step of "
                        f"{params.grad_accum} micro-batches; lower distill.grad_accum or batch_size")
    total_steps = params.epochs * steps_per_epoch

    objective: nn.Module = VlkdObjective(student, params, ranks)
    if ranks.world_size > 1:
        unused = not (params.ttdm_weight or params.itcl_weight) or not params.icti_weight
        objective = DistributedDataParallel(objective, find_unused_parameters=unused)
    if params.compile:
        objective = torch.compile(objective)
    # At most a tenth of the steps warm up: a continuation on a refresh's new rows is a short run, and a
    # warmup as long as the run would end it at its peak learning rate, undecayed.
    warmup = min(params.warmup_steps, total_steps // 10)
    optimization = Optimization(student, params.lr, params.weight_decay, warmup, total_steps,
                                params.schedule, params.max_grad_norm)
    checkpoint = Checkpoint(params.checkpoints / _run_key(params, selection, record)[:16] / CHECKPOINT)
    start_step, _ = checkpoint.resume(student, optimization, ranks.device)
    live = _open_live(params.plots, start_step) if ranks.is_main else None
    precision = _precision(params, ranks.device)

    logger.info("distilling %s rows into the student for %d steps (%d per epoch) on %d rank(s), %s",
                _rows_text(store, selection), total_steps, steps_per_epoch, ranks.world_size, ranks.device)
    started, recent, epochs, data = time.perf_counter(), {}, EpochMeans(), None
    with progress(total_steps, "distill", start_step, enabled=ranks.is_main) as bar:
        for step in range(start_step, total_steps):
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if data is None or in_epoch == 0:
                data = batches.epoch(epoch, skip=in_epoch * params.grad_accum)
            recent = _train_step(objective, student, data, retention, reading, params, ranks, step, precision)
            _check_finite(recent, step, checkpoint, ranks)
            recent["lr"] = optimization.step()
            if live is not None:
                _log_step(live, recent)
            epochs.add({name: value for name, value in recent.items() if name != "lr"})
            if in_epoch + 1 == steps_per_epoch:
                epochs.end_epoch()
            bar.set_postfix({name: f"{recent[name]:.3f}" for name in LOSSES if name in recent}, refresh=False)
            bar.update()
            if (step + 1) % params.checkpoint_every == 0 and step + 1 < total_steps and ranks.is_main:
                checkpoint.save(step + 1, student, optimization)

    elapsed = time.perf_counter() - started
    metrics = {
        "steps": total_steps, "epochs": params.epochs, "feature_rows": store.num_rows, "ranks": ranks.world_size,
        "trained_rows": _trained_rows(store, selection), "init": None if init is None else str(params.init),
        "final": {name: round(value, 5) for name, value in recent.items() if name in (*LOSSES, "loss")},
        "trainable_parameters": trainable(student.parameters()),
    }
    if ranks.is_main:
        _save_student(student, params, metrics, rows_seen_record(file_rows, seen), record)
        if live is not None:
            live.end()
        checkpoint.remove()
    if ranks.world_size > 1:
        dist.barrier()
    # How this run went: a resumed run ends with the same student, so none of this is in its files.
    metrics["this_run"] = {
        "resumed_from_step": start_step, "training_seconds": round(elapsed, 1),
        # the mean of each loss over each epoch this process trained
        "epoch_means": [{name: round(value, 5) for name, value in epoch.items()} for epoch in epochs.means],
        "samples_per_s": round((total_steps - start_step) * params.batch_size * params.grad_accum
                               * ranks.world_size / max(elapsed, 1e-9), 1),
    }
    return metrics


def _train_step(objective, student: Student, data, retention: RetentionBatches | None,
                reading: CaptionReading | None, params: DistillParams, ranks: Ranks, step: int,
                precision: str) -> dict[str, float]:
    """One optimizer step's forward and backward passes over `grad_accum` micro-batches (forward under
    autocast, backward outside it, as torch recommends); the losses, averaged over the micro-batches."""
    torch.manual_seed(_step_seed(params.seed, ranks.rank, step))
    noise = np.random.default_rng([params.seed, ranks.rank, step])
    totals: dict[str, torch.Tensor] = {}
    for micro in range(params.grad_accum):
        batch = next(data)
        inputs = _model_inputs(batch, student, params, noise, ranks.device)
        if retention is not None:
            inputs["retention"] = {name: tensor.to(ranks.device, non_blocking=True)
                                   for name, tensor in retention.batch(params.batch_size, noise).items()}
        if reading is not None:  # drawn last: the other terms' noise is the same with or without it
            inputs["reading"] = reading.batch(_image_captions(batch), noise)
        last = micro == params.grad_accum - 1
        sync = objective.no_sync() if isinstance(objective, DistributedDataParallel) and not last else nullcontext()
        with sync, autocast(ranks.device, precision):
            losses = objective(**inputs)
        with sync:
            (losses["loss"] / params.grad_accum).backward()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + value.detach() / params.grad_accum
    # One host sync per optimizer step, not one per loss and micro-batch: on a GPU each .item() waits for
    # the queued kernels.
    return dict(zip(totals, torch.stack(list(totals.values())).float().tolist(), strict=True))


def _model_inputs(batch: dict, student: Student, params: DistillParams, noise: np.random.Generator,
                  device: torch.device) -> dict:
    tokenizer = student.tokenizer
    encoded = tokenizer(batch["caption"], truncation=True, max_length=params.max_length, padding=True,
                        return_tensors="pt")
    texts = _icti_captions(batch, noise)
    infill = encoded if texts == batch["caption"] else tokenizer(texts, truncation=True, max_length=params.max_length,
                                                                padding=True, return_tensors="pt")
    noisy = noisy_batch(_unpadded(infill), tokenizer, params.mask_ratio, params.poisson_lambda, noise,
                        params.whole_caption_share, params.whole_caption_keep)
    prefix = batch["image_tokens"] if params.prefix == "patch" else batch.get("image_embedding")
    inputs = {"text_ids": encoded.input_ids, "text_mask": encoded.attention_mask, "noisy_ids": noisy["input_ids"],
              "noisy_mask": noisy["attention_mask"], "labels": noisy["labels"], "prefix_features": prefix,
              "image_embedding": batch.get("image_embedding"), "text_embedding": batch.get("text_embedding")}
    return {name: None if value is None else value.to(device, non_blocking=True) for name, value in inputs.items()}


def _icti_captions(batch: dict, noise: np.random.Generator) -> list[str]:
    """ICTI reconstructs one of each image's captions, drawn anew each step where the features list several;
    TTDM and ITCL stay on `caption`, the one whose teacher embedding is stored."""
    return [options[noise.integers(len(options))] for options in _image_captions(batch)]


def _image_captions(batch: dict) -> list[list[str]]:
    """Every caption of each image: the listed ones where the features list several, else the stored one."""
    listed = batch.get("captions") or [None] * len(batch["caption"])
    return [options or [caption] for caption, options in zip(batch["caption"], listed, strict=True)]


def _unpadded(encoded) -> list[list[int]]:
    return [ids[:int(mask.sum())].tolist() for ids, mask in zip(encoded.input_ids, encoded.attention_mask, strict=True)]


def _check_finite(losses: dict[str, float], step: int, checkpoint: Checkpoint, ranks: Ranks) -> None:
    bad = torch.tensor(0.0 if all(math.isfinite(v) for v in losses.values()) else 1.0)
    if ranks.world_size > 1:
        bad = bad.to(ranks.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        values = ", ".join(f"{name}={value:.4g}" for name, value in losses.items())
        kept = (f"the last good checkpoint is {checkpoint.path}" if checkpoint.path.exists()
                else "no checkpoint was written yet")
        raise VlkdError(f"the loss is not finite at step {step + 1} ({values}); {kept}; lower distill.lr or "
                        "check the features for NaN")


def _retention_batches(params: DistillParams, student: Student) -> RetentionBatches | None:
    if not params.retention_weight:
        return None
    # The text the language model knows is the plm stage's input, so DVC sees it through distill.plm.
    corpus = language_model_text(params.plm, "corpus", f"distill.retention_weight {params.retention_weight}")
    return RetentionBatches(corpus, student.tokenizer, params.plm, params.mask_ratio, params.poisson_lambda,
                            params.max_length)


def _caption_reading(params: DistillParams, student: Student, device: torch.device) -> CaptionReading | None:
    if not params.reading_weight:
        return None
    corpus = language_model_text(params.plm, "corpus", f"distill.reading_weight {params.reading_weight}")
    reader, _ = load_language_model(params.plm, "distill.plm")  # the language model as it was, frozen
    return CaptionReading(corpus, student.tokenizer, reader, params.reading_prompt, params.max_length, device)


# -- building the student --------------------------------------------------------------------------------
def _needed_columns(params: DistillParams, store: FeatureStore) -> list[str]:
    names = set(pq.read_schema(store.files[0]).names)
    needed = {"image_embedding"}
    if params.ttdm_weight:
        if "text_embedding" not in names:
            raise VlkdError(f"{store.files[0]} has no text_embedding column, which TTDM needs; re-extract the "
                            "features or set distill.ttdm_weight: 0")
        needed.add("text_embedding")
    if (params.icti_weight or params.reading_weight) and "captions" in names:
        needed.add("captions")
    if params.prefix == "patch":
        if "image_tokens" not in names:
            raise VlkdError(f"{store.files[0]} has no image_tokens column, which the patch prefix needs; set "
                            "features.image_tokens: true and re-extract, or use distill.prefix: pooled")
        needed.add("image_tokens")
    return sorted(needed)


def _build_student(params: DistillParams, store: FeatureStore, init: Path | None) -> Student:
    if init is not None:
        student = Student.from_pretrained(init)
        try:
            check_teacher(student.config.teacher, store.teacher, where=str(store.files[0].parent))
        except VlkdError as err:  # after a change of teacher, the usual way out is a new student
            raise VlkdError(f"{err}; or, for a new student of this teacher, empty distill.init {init} (keep its "
                            "README.md) or set distill.init: null") from err
        if student.config.prefix != params.prefix:
            raise VlkdError(f"the student in {init} has a {student.config.prefix} prefix, not "
                            f"distill.prefix {params.prefix}; set distill.prefix to match or drop distill.init")
        return student
    visual_width = store.embed_dim
    if params.prefix == "patch":
        visual_width = pq.read_schema(store.files[0]).field("image_tokens").type.value_type.list_size
    config = StudentConfig(teacher=store.teacher, embed_dim=store.embed_dim, prefix=params.prefix,
                           prefix_tokens=params.prefix_tokens, visual_width=visual_width,
                           itcl_temperature=params.itcl_temperature, plm=_plm_manifest(params.plm))
    student = Student.from_language_model(params.plm, config)
    student.logit_scale.requires_grad_(params.itcl_learnable_temperature)
    return student


def _init_folder(init: Path | None) -> Path | None:
    """The student to continue from. A folder with nothing in it but a README (the pipeline's
    data/promoted before a refresh has put the promoted student there) means a fresh student."""
    if init is None:
        return None
    if not init.is_dir():
        raise VlkdError(f"distill.init {init} is not a folder; point it at a student folder (one `vlkd distill` "
                        "wrote) or set it to null for a fresh student")
    if (init / STUDENT_CONFIG).is_file():
        return init
    if all(path.name == "README.md" for path in init.iterdir()):
        logger.info("distill.init %s holds no student: a fresh student from the language model", init)
        return None
    raise VlkdError(f"distill.init {init} has no {STUDENT_CONFIG}; point it at a student folder or empty it "
                    "for a fresh student")


def _row_selection(params: DistillParams, file_rows: dict[str, int], seen: dict[str, int] | None,
                   init: Path | None) -> RowSelection | None:
    """None: every row. Continuing from a student that records what it has seen: its unseen rows and a
    replayed sample of the rest, so the steps grow with the new rows, not with the corpus."""
    if seen is None:
        return None
    selection = continuation_rows(file_rows, seen, params.replay, params.seed)
    logger.info("continuing from %s: %d new feature rows and %d replayed of the %d it has seen", init,
                selection.new, selection.replayed, sum(seen.values()))
    return selection


def _file_rows(store: FeatureStore) -> dict[str, int]:
    return {path.name: pq.ParquetFile(path).metadata.num_rows for path in store.files}


def _trained_rows(store: FeatureStore, selection: RowSelection | None) -> dict:
    if selection is None:
        return {"all": store.num_rows}
    return {"new": selection.new, "replayed": selection.replayed}


def _rows_text(store: FeatureStore, selection: RowSelection | None) -> str:
    if selection is None:
        return f"{store.num_rows}"
    return f"{selection.total} ({selection.new} new, {selection.replayed} replayed) of {store.num_rows}"


def _nothing_new(student: Student, params: DistillParams, store: FeatureStore, init: Path, rows_seen: dict,
                 ranks: Ranks, record: StageRecord) -> dict:
    """Every row was seen by the init student: it is the result, written unchanged (with its record)."""
    logger.info("every feature row in %s was seen by the student in %s: nothing to distil, it is written as it is",
                params.features, init)
    metrics = {"steps": 0, "epochs": 0, "feature_rows": store.num_rows, "ranks": ranks.world_size,
               "trained_rows": {"new": 0, "replayed": 0}, "init": str(params.init), "final": {},
               "trainable_parameters": trainable(student.parameters())}
    if ranks.is_main:
        _save_student(student, params, metrics, rows_seen, record)
    if ranks.world_size > 1:
        dist.barrier()
    metrics["this_run"] = {"resumed_from_step": 0, "training_seconds": 0.0, "epoch_means": [], "samples_per_s": 0.0}
    return metrics


def stage_inputs(params: DistillParams) -> dict:
    """What distillation reads: the feature files, the language model and the student it continues from."""
    inputs = {"features": Path(params.features), "plm": Path(params.plm)}
    if params.init is not None:
        inputs["init"] = Path(params.init)
    return inputs


def _plm_manifest(folder: Path) -> dict:
    """What the student records of its language model: the manifest's identity, or the folder of a BART
    that was not made by `vlkd plm`."""
    if not (folder / PLM_MANIFEST).is_file():
        return {"source": str(folder)}
    record = read_manifest(folder)
    return {key: record[key] for key in ("name", "source", "sha256") if key in record}


# -- checkpoints -----------------------------------------------------------------------------------------
def _run_key(params: DistillParams, selection: RowSelection | None, record: StageRecord) -> str:
    """What a checkpoint must share with this run to be resumed: the record (inputs, code, libraries) and
    the params, but not the params that only say where and how fast."""
    return fingerprint({
        "params": {k: v for k, v in params.model_dump(mode="json").items() if k not in _NOT_IN_FINGERPRINT},
        "inputs": record.inputs, "code": record.code, "libraries": record.libraries,
        "rows": None if selection is None else {name: len(rows) for name, rows in selection.rows.items()},
    })


def _save_student(student: Student, params: DistillParams, metrics: dict, rows_seen: dict,
                  record: StageRecord) -> None:
    with building_folder(params.output, STUDENT_CONFIG, "student", "distill.output") as building:
        student.save_pretrained(building)
        write_json_atomic(building / METRICS, {k: v for k, v in metrics.items() if k != "this_run"})
        write_json_atomic(building / ROWS_SEEN, rows_seen)
        record.write(building)
    logger.info("student written to %s", params.output)


# -- plumbing --------------------------------------------------------------------------------------------
def _init_distributed(requested: str) -> Ranks:
    device = resolve_device(requested, "distill.device")  # under torchrun, the GPU of this LOCAL_RANK
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Ranks(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def _precision(params: DistillParams, device: torch.device) -> str:
    if params.precision == "bf16" and device.type != "cuda":
        raise VlkdError("distill.precision bf16 needs a CUDA device; use auto or fp32 on CPU")
    return resolve_precision(params.precision, device)


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _open_live(folder: Path, start_step: int):
    from dvclive import Live  # imported here: dvclive pulls in much of DVC

    live = Live(dir=str(folder), resume=start_step > 0, save_dvc_exp=False, dvcyaml=None, report=None)
    live.step = start_step
    return live


def _log_step(live, values: dict[str, float]) -> None:
    for name, value in values.items():
        live.log_metric(f"train/{name}", value)
    live.next_step()
