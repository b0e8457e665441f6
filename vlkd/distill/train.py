"""`vlkd distill`: VLKD from stored teacher features into the language model (the VLKD paper, arXiv 2203.06386).

One process, or one per GPU/CPU under `torchrun` (DistributedDataParallel; gloo on CPU, nccl on CUDA).
All randomness of optimizer step s on rank r (dropout, span masking) is drawn from seeds made of
(seed, rank, s), and the data order from (seed, epoch), so a run resumed from a checkpoint takes
exactly the steps an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
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
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from vlkd.config import DistillParams
from vlkd.distill.data import FeatureBatches
from vlkd.distill.losses import ItclLoss, noisy_batch, ttdm_loss
from vlkd.distill.retention import RetentionBatches
from vlkd.errors import VlkdError
from vlkd.features.reader import FeatureStore
from vlkd.io import remove_path, replace_folder, sha256_file, tmp_path_for, write_json_atomic
from vlkd.models.plm import language_model_text
from vlkd.models.student import Student, StudentConfig
from vlkd.training import decay_groups, deterministic_cuda

logger = logging.getLogger(__name__)

LOSSES = ("ttdm", "itcl", "icti", "retention")
WHITENING_ROWS = 200_000  # image embeddings the whitening is estimated from (plenty for a 1024-d covariance)
CHECKPOINT = "last.pt"
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
    """The weighted sum of TTDM, ITCL and ICTI for one batch; the module DDP wraps."""

    def __init__(self, student: Student, params: DistillParams, ranks: Ranks):
        super().__init__()
        self.student, self.params = student, params
        self.itcl = ItclLoss(ranks.rank, ranks.world_size)

    def forward(self, text_ids, text_mask, noisy_ids, noisy_mask, labels, prefix_features, image_embedding,
                text_embedding, retention=None) -> dict[str, torch.Tensor]:
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
        weights = {"ttdm": p.ttdm_weight, "itcl": p.itcl_weight, "icti": p.icti_weight,
                   "retention": p.retention_weight}
        losses["loss"] = sum(weights[name] * value for name, value in losses.items())
        return losses


def _distill(params: DistillParams, ranks: Ranks) -> dict:
    if not (params.ttdm_weight or params.itcl_weight or params.icti_weight):
        raise VlkdError("distill.ttdm_weight, itcl_weight and icti_weight are all 0; set at least one above 0")
    store = FeatureStore(params.features)
    columns = _needed_columns(params, store)
    torch.manual_seed(params.seed)  # the new projections' initial weights: the same on every rank and run
    student = _build_student(params, store).to(ranks.device)
    student.train()
    batches = FeatureBatches(store, columns, params.batch_size, params.seed, ranks.rank, ranks.world_size)
    retention = _retention_batches(params, student)
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
    optimizer = torch.optim.AdamW(_param_groups(student, params), lr=params.lr)
    schedule = get_cosine_schedule_with_warmup if params.schedule == "cosine" else get_linear_schedule_with_warmup
    scheduler = schedule(optimizer, params.warmup_steps, total_steps)

    fingerprint = _run_fingerprint(params, store, student)
    checkpoint = params.checkpoints / fingerprint[:16] / CHECKPOINT
    start_step = _resume(checkpoint, student, optimizer, scheduler, ranks)
    live = _open_live(params.plots, start_step) if ranks.is_main else None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if _use_bf16(params, ranks.device) else nullcontext())

    logger.info("distilling %s rows into the student for %d steps (%d per epoch) on %d rank(s), %s",
                store.num_rows, total_steps, steps_per_epoch, ranks.world_size, ranks.device)
    started, recent, epoch_sums = time.perf_counter(), {}, {}
    epoch_means: list[dict[str, float]] = []
    data = None
    progress = tqdm(total=total_steps, initial=start_step, desc="distill", unit="step",
                    disable=None if ranks.is_main else True)
    with progress as bar:
        for step in range(start_step, total_steps):
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if data is None or in_epoch == 0:
                data = batches.epoch(epoch, skip=in_epoch * params.grad_accum)
            recent = _train_step(objective, student, data, retention, params, ranks, step, autocast)
            _check_finite(recent, step, checkpoint, ranks)
            torch.nn.utils.clip_grad_norm_(student.parameters(), params.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            recent["lr"] = scheduler.get_last_lr()[0]
            if live is not None:
                _log_step(live, recent)
            _add_to_epoch(epoch_sums, epoch_means, recent, in_epoch + 1 == steps_per_epoch)
            bar.set_postfix({name: f"{recent[name]:.3f}" for name in LOSSES if name in recent}, refresh=False)
            bar.update()
            if (step + 1) % params.checkpoint_every == 0 and step + 1 < total_steps and ranks.is_main:
                _save_checkpoint(checkpoint, step + 1, student, optimizer, scheduler)

    elapsed = time.perf_counter() - started
    metrics = {
        "steps": total_steps, "epochs": params.epochs, "feature_rows": store.num_rows, "ranks": ranks.world_size,
        "final": {name: round(value, 5) for name, value in recent.items() if name in (*LOSSES, "loss")},
        "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
    }
    if ranks.is_main:
        _save_student(student, params, metrics)
        if live is not None:
            live.end()
        remove_path(checkpoint.parent)
    if ranks.world_size > 1:
        dist.barrier()
    # How this run went: a resumed run ends with the same student, so none of this is in its files.
    metrics["this_run"] = {
        "resumed_from_step": start_step, "training_seconds": round(elapsed, 1),
        "epoch_means": epoch_means,  # the mean of each loss over each epoch this process trained
        "samples_per_s": round((total_steps - start_step) * params.batch_size * params.grad_accum
                               * ranks.world_size / max(elapsed, 1e-9), 1),
    }
    return metrics


def _train_step(objective, student: Student, data, retention: RetentionBatches | None, params: DistillParams,
                ranks: Ranks, step: int, autocast) -> dict[str, float]:
    """One optimizer step's forward and backward passes over `grad_accum` micro-batches."""
    torch.manual_seed(_step_seed(params.seed, ranks.rank, step))
    noise = np.random.default_rng([params.seed, ranks.rank, step])
    totals: dict[str, float] = {}
    for micro in range(params.grad_accum):
        inputs = _model_inputs(next(data), student, params, noise, ranks.device)
        if retention is not None:
            inputs["retention"] = {name: tensor.to(ranks.device, non_blocking=True)
                                   for name, tensor in retention.batch(params.batch_size, noise).items()}
        last = micro == params.grad_accum - 1
        sync = objective.no_sync() if isinstance(objective, DistributedDataParallel) and not last else nullcontext()
        with sync, autocast:
            losses = objective(**inputs)
        with sync:
            (losses["loss"] / params.grad_accum).backward()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + value.item() / params.grad_accum
    return totals


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


def _param_groups(student: Student, params: DistillParams) -> list[dict]:
    """`decay_groups`, with the layers VLKD adds to BART (W_v and its LayerNorm, W_t) at
    `projection_lr_scale` times the learning rate: they start from scratch, BART does not."""
    added = {id(param) for layer in student.added_layers() for param in layer.parameters()}
    groups = []
    for group in decay_groups(student, params.weight_decay):
        for scale, members in ((1.0, [p for p in group["params"] if id(p) not in added]),
                               (params.projection_lr_scale, [p for p in group["params"] if id(p) in added])):
            if members:
                groups.append({**group, "params": members, "lr": params.lr * scale})
    return groups


def _icti_captions(batch: dict, noise: np.random.Generator) -> list[str]:
    """ICTI reconstructs one of each image's captions, drawn anew each step where the features list several;
    TTDM and ITCL stay on `caption`, the one whose teacher embedding is stored."""
    listed = batch.get("captions") or [None] * len(batch["caption"])
    chosen = []
    for caption, options in zip(batch["caption"], listed, strict=True):
        options = options or [caption]
        chosen.append(options[noise.integers(len(options))])
    return chosen


def _unpadded(encoded) -> list[list[int]]:
    return [ids[:int(mask.sum())].tolist() for ids, mask in zip(encoded.input_ids, encoded.attention_mask, strict=True)]


def _add_to_epoch(sums: dict, means: list, losses: dict[str, float], epoch_done: bool) -> None:
    for name in (*LOSSES, "loss"):
        if name in losses:
            total, count = sums.get(name, (0.0, 0))
            sums[name] = (total + losses[name], count + 1)
    if epoch_done:
        means.append({name: round(total / count, 5) for name, (total, count) in sums.items()})
        sums.clear()


def _check_finite(losses: dict[str, float], step: int, checkpoint: Path, ranks: Ranks) -> None:
    bad = torch.tensor(0.0 if all(math.isfinite(v) for v in losses.values()) else 1.0)
    if ranks.world_size > 1:
        bad = bad.to(ranks.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        values = ", ".join(f"{name}={value:.4g}" for name, value in losses.items())
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint.exists() else "no checkpoint was written yet"
        raise VlkdError(f"the loss is not finite at step {step + 1} ({values}); {kept}; lower distill.lr or "
                        "check the features for NaN")


def _retention_batches(params: DistillParams, student: Student) -> RetentionBatches | None:
    if not params.retention_weight:
        return None
    # The text the language model knows is the plm stage's input, so DVC sees it through distill.plm.
    corpus = language_model_text(params.plm, "corpus", f"distill.retention_weight {params.retention_weight}")
    return RetentionBatches(corpus, student.tokenizer, params.plm, params.mask_ratio, params.poisson_lambda,
                            params.max_length)


# -- building the student --------------------------------------------------------------------------------
def _needed_columns(params: DistillParams, store: FeatureStore) -> list[str]:
    names = set(pq.read_schema(store.files[0]).names)
    needed = {"image_embedding"}
    if params.ttdm_weight:
        if "text_embedding" not in names:
            raise VlkdError(f"{store.files[0]} has no text_embedding column, which TTDM needs; re-extract the "
                            "features or set distill.ttdm_weight: 0")
        needed.add("text_embedding")
    if params.icti_weight and "captions" in names:
        needed.add("captions")
    if params.prefix == "patch":
        if "image_tokens" not in names:
            raise VlkdError(f"{store.files[0]} has no image_tokens column, which the patch prefix needs; set "
                            "features.image_tokens: true and re-extract, or use distill.prefix: pooled")
        needed.add("image_tokens")
    return sorted(needed)


def _build_student(params: DistillParams, store: FeatureStore) -> Student:
    if params.init is not None:
        student = Student.from_pretrained(params.init)
        check_teacher(student.config, store.teacher, where=str(store.files[0].parent))
        if student.config.prefix != params.prefix:
            raise VlkdError(f"the student in {params.init} has a {student.config.prefix} prefix, not "
                            f"distill.prefix {params.prefix}; set distill.prefix to match or drop distill.init")
        return student
    visual_width = store.embed_dim
    if params.prefix == "patch":
        visual_width = pq.read_schema(store.files[0]).field("image_tokens").type.value_type.list_size
    config = StudentConfig(teacher=store.teacher, embed_dim=store.embed_dim, prefix=params.prefix,
                           prefix_tokens=params.prefix_tokens, visual_width=visual_width,
                           itcl_temperature=params.itcl_temperature, plm=_plm_manifest(params.plm),
                           whiten=params.whiten_features)
    student = Student.from_language_model(params.plm, config)
    student.logit_scale.requires_grad_(params.itcl_learnable_temperature)
    if params.whiten_features:
        student.set_whitening(_image_embeddings(store, WHITENING_ROWS))
    return student


def _image_embeddings(store: FeatureStore, rows: int) -> torch.Tensor:
    """The first `rows` stored image embeddings (every rank reads the same ones)."""
    batches, count = [], 0
    for batch in store.iter_batches(4096, columns=("image_embedding",)):
        batches.append(batch["image_embedding"][:rows - count])
        count += len(batches[-1])
        if count >= rows:
            break
    return torch.cat(batches)


def check_teacher(config: StudentConfig, teacher: dict, where: str) -> None:
    """Refuse features from another teacher than the one the student was distilled from."""
    if config.teacher != teacher:
        def described(fingerprint: dict) -> str:
            grid = fingerprint.get("token_grid")
            return (f"{fingerprint['model']} (weights {fingerprint['weights_sha256'][:12]}"
                    f"{f', tokens pooled to {grid} x {grid}' if grid else ''}, open_clip "
                    f"{fingerprint.get('open_clip_version', '?')})")

        raise VlkdError(f"features in {where} were made by teacher {described(teacher)}, but the student was "
                        f"distilled from {described(config.teacher)}; extract features with the student's teacher")


def _plm_manifest(folder: Path) -> dict:
    manifest = folder / "vlkd-plm.json"
    if manifest.is_file():
        record = json.loads(manifest.read_text())
        return {key: record[key] for key in ("name", "source", "sha256") if key in record}
    return {"source": str(folder)}


# -- checkpoints -----------------------------------------------------------------------------------------
def _run_fingerprint(params: DistillParams, store: FeatureStore, student: Student) -> str:
    """What a checkpoint must share with this run to be resumed."""
    record = {
        "params": {k: v for k, v in params.model_dump(mode="json").items() if k not in _NOT_IN_FINGERPRINT},
        "features": {path.name: pq.ParquetFile(path).metadata.num_rows for path in store.files},
        "teacher": store.teacher, "plm": student.config.plm,
        "init": sha256_file(params.init / "projections.safetensors") if params.init else None,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _save_checkpoint(path: Path, step: int, student: Student, optimizer, scheduler) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    torch.save({"step": step, "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, tmp)
    tmp.replace(path)
    logger.debug("checkpoint at step %d: %s", step, path)


def _resume(path: Path, student: Student, optimizer, scheduler, ranks: Ranks) -> int:
    if not path.exists():
        return 0
    state = torch.load(path, map_location=ranks.device, weights_only=True)
    student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    logger.info("resuming from %s at step %d", path, state["step"])
    return state["step"]


def _save_student(student: Student, params: DistillParams, metrics: dict) -> None:
    building = params.output.parent / f".{params.output.name}.building"
    remove_path(building)
    student.save_pretrained(building)
    write_json_atomic(building / "distill-metrics.json", {k: v for k, v in metrics.items() if k != "this_run"})
    replace_folder(building, params.output)
    logger.info("student written to %s", params.output)


# -- plumbing --------------------------------------------------------------------------------------------
def _init_distributed(device: str) -> Ranks:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda" and not torch.cuda.is_available():
        raise VlkdError("distill.device is cuda but torch sees no CUDA device; use auto or cpu")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        deterministic_cuda()
    if world_size == 1:
        return Ranks(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return Ranks(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def _use_bf16(params: DistillParams, device: torch.device) -> bool:
    if params.precision == "bf16" and device.type != "cuda":
        raise VlkdError("distill.precision bf16 needs a CUDA device; use auto or fp32 on CPU")
    return device.type == "cuda" and params.precision in ("auto", "bf16")


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
