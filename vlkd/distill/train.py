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
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlkd.config import DistillParams
from vlkd.data.feature_store import FeatureStore
from vlkd.data.kept_rows import kept_rows
from vlkd.distill.data import FeatureBatches
from vlkd.distill.objective import LOSSES, Ranks, VlkdObjective, train_step
from vlkd.distill.reading import CaptionReading
from vlkd.distill.retention import RetentionBatches
from vlkd.distill.rows import (
    ROWS_SEEN,
    RowSelection,
    continuation_rows,
    every_row,
    read_rows_seen,
    rows_seen_record,
)
from vlkd.distill.start import build_student, init_folder, needed_columns
from vlkd.errors import VlkdError
from vlkd.io import building_folder, write_json_atomic
from vlkd.models.language_model import language_model_text
from vlkd.models.student import STUDENT_CONFIG, Student, load_language_model
from vlkd.record import StageRecord, files_sha256, fingerprint
from vlkd.training import (
    Checkpoint,
    EpochMeans,
    Optimization,
    progress,
    resolve_device,
    resolve_precision,
    trainable,
)

logger = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
METRICS = "distill-metrics.json"
# Params that do not change what is computed: a checkpoint made with other values still resumes.
_NOT_IN_FINGERPRINT = {"output", "checkpoints", "plots", "checkpoint_every", "device", "compile"}


def distill(params: DistillParams) -> dict:
    """Train the student and write it to `params.output`; returns the stage's metrics."""
    ranks = _init_distributed(params.device)
    try:
        return _distill(params, ranks)
    finally:
        if ranks.world_size > 1:
            dist.destroy_process_group()


def _distill(params: DistillParams, ranks: Ranks) -> dict:
    if not (params.ttdm_weight or params.itcl_weight or params.icti_weight):
        raise VlkdError("distill.ttdm_weight, itcl_weight and icti_weight are all 0; set at least one above 0")
    store = FeatureStore(params.features)
    record = StageRecord.of("distill", __name__, params, stage_inputs(params), params.output / STUDENT_CONFIG)
    if record.reusable(params.output):
        logger.info("student in %s is up to date with its record; not trained again", params.output)
        return {**json.loads((params.output / METRICS).read_text()), "this_run": {"reused": True}}
    columns = needed_columns(params, store)
    init = init_folder(params.init)
    file_rows, seen = _file_rows(store), None if init is None else read_rows_seen(init)
    torch.manual_seed(params.seed)  # the new projections' initial weights: the same on every rank and run
    student = build_student(params, store, init).to(ranks.device)
    student.train()
    selection = _row_selection(params, store, file_rows, seen, init)
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
    # max_steps (as transformers' TrainingArguments has it) fixes the budget in steps whatever the rows: a
    # filtered corpus and the unfiltered one compared at the same compute.
    total_steps = params.max_steps or params.epochs * steps_per_epoch

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
                                params.schedule, params.max_grad_norm, lr_multipliers=_rates(params))
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
            recent = train_step(objective, student, data, retention, reading, params, ranks, step, precision)
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
        "steps": total_steps, "epochs": math.ceil(total_steps / steps_per_epoch), "feature_rows": store.num_rows,
        "ranks": ranks.world_size,
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


def _row_selection(params: DistillParams, store: FeatureStore, file_rows: dict[str, int],
                   seen: dict[str, int] | None, init: Path | None) -> RowSelection | None:
    """None: every row. With the filter's output (distill.kept), only the rows it kept. Continuing from a
    student that records what it has seen: the unseen ones and a replayed sample of the rest, so the steps
    grow with the new rows, not with the corpus."""
    if params.kept is None:
        if seen is None:
            return None
        available = {name: np.arange(rows) for name, rows in file_rows.items()}
    else:
        available = kept_rows(params.kept, dict(zip([p.name for p in store.files], files_sha256(store.files),
                                                    strict=True)))
        logger.info("the filter in %s kept %d of the %d feature rows", params.kept,
                    sum(len(rows) for rows in available.values()), sum(file_rows.values()))
    if seen is None:
        selection = every_row(available)
        if not selection.total:
            raise VlkdError(f"the filter in {params.kept} kept none of the {sum(file_rows.values())} feature rows "
                            "(its summary.json says why); loosen the filter's rules or set distill.kept: null")
        return selection
    selection = continuation_rows(available, seen, params.replay, params.seed)
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
    """No kept row is new to the init student (every row was seen, or the filter dropped the new ones): it is
    the result, written unchanged (with its record), and its curves folder is written empty, since DVC
    requires every declared output, plots included, to exist after the command."""
    kept = "" if params.kept is None else f" that the filter in {params.kept} kept"
    logger.info("no feature row%s in %s is new to the student in %s: nothing to distil, it is written as it is",
                kept, params.features, init)
    metrics = {"steps": 0, "epochs": 0, "feature_rows": store.num_rows, "ranks": ranks.world_size,
               "trained_rows": {"new": 0, "replayed": 0}, "init": str(params.init), "final": {},
               "trainable_parameters": trainable(student.parameters())}
    if ranks.is_main:
        _save_student(student, params, metrics, rows_seen, record)
        (params.plots / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
    if ranks.world_size > 1:
        dist.barrier()
    metrics["this_run"] = {"resumed_from_step": 0, "training_seconds": 0.0, "epoch_means": [], "samples_per_s": 0.0}
    return metrics


def stage_inputs(params: DistillParams) -> dict:
    """What distillation reads: the feature files, the language model and the student it continues from."""
    inputs = {"features": Path(params.features), "plm": Path(params.plm)}
    if params.kept is not None:
        inputs["kept"] = Path(params.kept)
    if params.init is not None:
        inputs["init"] = Path(params.init)
    return inputs


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


def _rates(params: DistillParams) -> dict[str, float] | None:
    """The language model's parameters (the student's `bart.`) at distill.language_model_lr, if set."""
    return None if params.language_model_lr is None else {"bart.": params.language_model_lr / params.lr}


def _open_live(folder: Path, start_step: int):
    from dvclive import Live  # imported here: dvclive pulls in much of DVC

    live = Live(dir=str(folder), resume=start_step > 0, save_dvc_exp=False, dvcyaml=None, report=None)
    live.step = start_step
    return live


def _log_step(live, values: dict[str, float]) -> None:
    for name, value in values.items():
        live.log_metric(f"train/{name}", value)
    live.next_step()
