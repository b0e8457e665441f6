"""VLKD's objective for one optimizer step: the batch's model inputs (the caption for TTDM and ITCL, a
noised caption for ICTI, the image prefix), the weighted sum of TTDM, ITCL and ICTI (and retention and
caption reading, when on), and the forward and backward passes over the step's micro-batches.

All randomness of optimizer step s on rank r (dropout, span masking, which caption ICTI rewrites) is drawn
from seeds made of (seed, rank, s), so a resumed run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlkd.config import DistillParams
from vlkd.distill.reading import CaptionReading
from vlkd.distill.retention import RetentionBatches
from vlkd.models.losses import ItclLoss, noisy_batch, reading_loss, ttdm_loss
from vlkd.models.student import Student
from vlkd.training import autocast

LOSSES = ("ttdm", "itcl", "icti", "retention", "reading")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def train_step(objective, student: Student, data, retention: RetentionBatches | None,
                reading: CaptionReading | None, params: DistillParams, ranks: Ranks, step: int,
                precision: str) -> dict[str, float]:
    """One optimizer step's forward and backward passes over `grad_accum` micro-batches (forward under
    autocast, backward outside it, as torch recommends); the losses, averaged over the micro-batches."""
    torch.manual_seed(step_seed(params.seed, ranks.rank, step))
    noise = np.random.default_rng([params.seed, ranks.rank, step])
    totals: dict[str, torch.Tensor] = {}
    for micro in range(params.grad_accum):
        batch = next(data)
        inputs = model_inputs(batch, student, params, noise, ranks.device)
        if retention is not None:
            inputs["retention"] = {name: tensor.to(ranks.device, non_blocking=True)
                                   for name, tensor in retention.batch(params.batch_size, noise).items()}
        if reading is not None:  # drawn last: the other terms' noise is the same with or without it
            inputs["reading"] = reading.batch(image_captions(batch), noise)
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


def model_inputs(batch: dict, student: Student, params: DistillParams, noise: np.random.Generator,
                  device: torch.device) -> dict:
    tokenizer = student.tokenizer
    encoded = tokenizer(batch["caption"], truncation=True, max_length=params.max_length, padding=True,
                        return_tensors="pt")
    texts = icti_captions(batch, noise)
    infill = encoded if texts == batch["caption"] else tokenizer(texts, truncation=True, max_length=params.max_length,
                                                                padding=True, return_tensors="pt")
    noisy = noisy_batch(_unpadded(infill), tokenizer, params.mask_ratio, params.poisson_lambda, noise,
                        params.whole_caption_share, params.whole_caption_keep)
    image = batch.get("text_embedding" if params.aligned_teacher else "image_embedding")
    prefix = batch["image_tokens"] if params.prefix == "patch" else image
    inputs = {"text_ids": encoded.input_ids, "text_mask": encoded.attention_mask, "noisy_ids": noisy["input_ids"],
              "noisy_mask": noisy["attention_mask"], "labels": noisy["labels"], "prefix_features": prefix,
              "image_embedding": image, "text_embedding": batch.get("text_embedding")}
    return {name: None if value is None else value.to(device, non_blocking=True) for name, value in inputs.items()}


def icti_captions(batch: dict, noise: np.random.Generator) -> list[str]:
    """ICTI reconstructs one of each image's captions, drawn anew each step where the features list several;
    TTDM and ITCL stay on `caption`, the one whose teacher embedding is stored."""
    return [options[noise.integers(len(options))] for options in image_captions(batch)]


def image_captions(batch: dict) -> list[list[str]]:
    """Every caption of each image: the listed ones where the features list several, else the stored one."""
    listed = batch.get("captions") or [None] * len(batch["caption"])
    return [options or [caption] for caption, options in zip(batch["caption"], listed, strict=True)]


def _unpadded(encoded) -> list[list[int]]:
    return [ids[:int(mask.sum())].tolist() for ids, mask in zip(encoded.input_ids, encoded.attention_mask, strict=True)]


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
