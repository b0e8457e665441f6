"""The three objectives of the VLKD paper (arXiv 2203.06386). The teacher's embeddings come from the feature
store (frozen); only the student's side carries gradients.

  TTDM  distance between the student's projected text embedding W_t(pool(BART_enc(T))) and CLIP's t_C.
  ITCL  symmetric InfoNCE between CLIP's image embedding v_i and the student's text embedding of caption j,
        in-batch negatives (across all ranks under DDP): open_clip's own ClipLoss.
  ICTI  BART's denoising loss with the image prefix in front of the masked caption (Student.infilling_loss).

And one term not in the paper (distill/reading.py): caption reading, the student with the image prefix
against the language model with the caption, at the answer of a question.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from vlkd.data.noising import infill_spans
from vlkd.models.student import normalized


def ttdm_loss(student_text: torch.Tensor, teacher_text: torch.Tensor, distance: str = "mse") -> torch.Tensor:
    """`mse`: squared L2 distance between the raw projection and CLIP's (unit) embedding, mean over the
    batch; `cosine`: mean of 1 - cos. Both are 0 when the student reproduces CLIP's embedding exactly."""
    teacher_text = teacher_text.to(student_text.dtype)
    if distance == "mse":
        return (student_text - teacher_text).pow(2).sum(-1).mean()
    if distance == "cosine":
        return (1 - F.cosine_similarity(student_text, teacher_text, dim=-1)).mean()
    raise ValueError(f"unknown TTDM distance {distance!r}; use mse or cosine")


def reading_loss(logits: torch.Tensor, copy_labels: torch.Tensor, answer_position: torch.Tensor,
                 answer_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Caption reading: the cross-entropy of rewriting the prompt (`copy_labels`, -100 elsewhere) plus the
    KL(target || student) of the answer, summed over its slots (`answer_position` [rows, slots] where
    `answer_mask`), `target` [rows, slots, vocabulary] being the language model's log-probabilities there
    when it reads the caption instead of the image. Both terms are means over rows."""
    copy = F.cross_entropy(logits.flatten(0, 1).float(), copy_labels.flatten(), ignore_index=-100)
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1)
    answer = logits[rows, answer_position].float().log_softmax(-1)
    kl = (target.exp() * (target - answer)).sum(-1)
    return copy + (kl * answer_mask).sum() / logits.shape[0]


class ItclLoss(torch.nn.Module):
    """CLIP image embeddings against the student's text embeddings, both L2-normalised, scaled by
    exp(logit_scale). Under DDP every rank's batch is a negative for every other rank's."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.clip_loss = ClipLoss(local_loss=world_size > 1, gather_with_grad=world_size > 1,
                                  rank=rank, world_size=world_size)

    def forward(self, teacher_image: torch.Tensor, student_text: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        return self.clip_loss(normalized(teacher_image), normalized(student_text), logit_scale.exp())


def noisy_batch(token_lists: list[list[int]], tokenizer, ratio: float, poisson_lambda: float,
                rng: np.random.Generator, whole_share: float = 0.0, whole_keep: int = 0) -> dict[str, torch.Tensor]:
    """ICTI's encoder inputs (captions with spans masked) and labels (the whole captions), padded.
    Each token list is a caption's ids with BOS and EOS; those two are never masked. With `whole_share`,
    that share of the captions is masked whole (one <mask>): the decoder writes the caption from the image
    alone, as free generation (captioning, describe mode) must. With `whole_keep`, such a caption keeps its
    first k tokens (k uniform in 0..whole_keep, fewer than the caption has) and the rest is the one <mask>:
    the decoder learns to finish a caption from its opening words, as a prompt like "there is <mask>" asks."""
    inputs, labels = [], []
    for ids in token_lists:
        whole = whole_share > 0 and rng.random() < whole_share  # no draw at 0: the paper's noise stream
        keep = 0
        if whole and whole_keep:  # no draw otherwise: the noise stream without whole_keep is unchanged
            keep = min(int(rng.integers(0, whole_keep + 1)), max(len(ids) - 3, 0))  # at least one token masked
        body = infill_spans(ids[1 + keep:-1], tokenizer.mask_token_id, 1.0 if whole else ratio, poisson_lambda, rng)
        inputs.append([*ids[:1 + keep], *body, ids[-1]])
        labels.append(ids)
    input_ids, attention_mask = _pad(inputs, tokenizer.pad_token_id)
    label_ids, label_mask = _pad(labels, tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": label_ids.masked_fill(label_mask == 0, -100)}


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, :len(sequence)] = 1
    return ids, mask
