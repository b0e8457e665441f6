"""One fine-tuning run: the ViLT task model on a subset of a task's training split, with or without CLIP-TD,
then scored on the test splits. The projection heads are a separate module that is never saved: the
model a run returns is exactly a ViltForQuestionAnswering, whatever the variant."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from vlkd.config import FinetuneParams
from vlkd.data.vqa_metric import aggregate, question_accuracy
from vlkd.finetune.clip_td import VARIANT_RULES, distillation_loss, relevance, token_distance, top_k
from vlkd.finetune.targets import Targets
from vlkd.finetune.tasks import Example, Split
from vlkd.models.vilt import PatchOrder, TextBatch, encode, tokenize
from vlkd.training import Checkpoint, EpochMeans, Optimization

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    name: str
    kind: str  # vqa | ve
    labels: list[str]
    train: Split
    tests: dict[str, Split]  # test, shifted
    pixels: dict[Path, torch.Tensor]  # every image the task uses, as the student's processor prepares it
    targets: Targets
    tokenizer: object
    max_length: int
    label_index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.label_index = {label: i for i, label in enumerate(self.labels)}

    def inputs(self, batch: list[Example], device: torch.device) -> tuple[TextBatch, torch.Tensor]:
        """The student's text and pixels for a batch of examples."""
        text = tokenize(self.tokenizer, [e.text for e in batch], self.max_length).to(device)
        return text, torch.stack([self.pixels[e.image] for e in batch]).to(device)


class Projections(torch.nn.Module):
    """P: the student's hidden size to the teacher's embedding space, one head per modality (training only)."""

    def __init__(self, hidden: int, embed_dim: int) -> None:
        super().__init__()
        self.text = torch.nn.Linear(hidden, embed_dim)
        self.image = torch.nn.Linear(hidden, embed_dim)


def task_model(vlm: Path, labels: list[str], seed: int):
    """The pretrained ViLT with a fresh classifier over `labels` (initialised from `seed`)."""
    from transformers import ViltForQuestionAnswering
    from transformers.utils import logging as transformers_logging

    # Its load report would list, every run, what is expected: the MLM head left out, the classifier new.
    transformers_logging.set_verbosity_error()
    torch.manual_seed(seed)
    return ViltForQuestionAnswering.from_pretrained(
        str(vlm), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)})


def run(params: FinetuneParams, task: TaskData, vlm: Path, subset: list[str], seed: int, variant: str,
        device: torch.device, checkpoint_file: Path) -> tuple[torch.nn.Module, dict]:
    """Fine-tune on the examples whose ids are `subset`; returns (task model, {"losses", "steps", scores})."""
    distil, select, weigh = VARIANT_RULES[variant]
    model = task_model(vlm, task.labels, seed).to(device)
    heads = Projections(model.config.hidden_size, task.targets.image.shape[1]).to(device)
    order = PatchOrder(model.vilt)
    by_id = {example.id: example for example in task.train.examples}
    examples = [by_id[example_id] for example_id in subset]
    steps = max(params.min_steps, math.ceil(params.epochs * len(examples) / params.batch_size))
    trained = torch.nn.ModuleDict({"model": model, "heads": heads})
    optimization = Optimization(trained, params.lr, params.weight_decay, round(params.warmup_share * steps), steps,
                                max_grad_norm=params.max_grad_norm,
                                lr_multipliers={"model.classifier.": params.head_lr_multiplier})
    batches = schedule(len(examples), params.batch_size, steps, torch.Generator().manual_seed(seed))
    checkpoint = Checkpoint(checkpoint_file)
    start, _ = checkpoint.resume(trained, optimization)
    means = EpochMeans()
    model.train()
    for step in range(start, steps):
        batch = [examples[i] for i in batches[step]]
        text, pixels = task.inputs(batch, device)
        encoded = encode(model.vilt, order, text, pixels)
        task_loss = _task_loss(model.classifier(encoded.pooled), batch, task, device)
        loss, losses = task_loss, [task_loss]
        if distil and params.distill_weight > 0:
            rows = torch.tensor([task.targets.row_of[e.id] for e in batch])
            kd = _distillation(encoded, text, heads, task.targets, rows, select, weigh, params, device)
            loss, losses = task_loss + params.distill_weight * kd, [task_loss, kd]
        loss.backward()
        optimization.step()
        means.add(dict(zip(("task", "distill"), torch.stack(losses).tolist(), strict=False)))
        if (step + 1) % params.checkpoint_every == 0 and step + 1 < steps:
            checkpoint.save(step + 1, trained, optimization)
    checkpoint.remove()
    model.eval()
    scores = {name: evaluate(model, order, task, split, params.eval_batch_size, device)
              for name, split in task.tests.items()}
    return model, {"steps": steps, "examples": len(examples), "losses": means.end_epoch(), "scores": scores}


def schedule(count: int, size: int, steps: int, generator: torch.Generator) -> list[list[int]]:
    """Every step's batch of example indices, drawn up front: a fresh seeded permutation per pass over the
    examples, passes repeated until `steps`. A resumed run indexes it from its checkpoint's step."""
    size = min(size, count)
    per_pass = max(1, count // size)
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = torch.randperm(count, generator=generator)
        batches += [order[b * size:(b + 1) * size].tolist() for b in range(per_pass)]
    return batches[:steps]


def _task_loss(logits: torch.Tensor, batch: list[Example], task: TaskData, device: torch.device) -> torch.Tensor:
    if task.kind == "ve":
        target = torch.tensor([task.label_index[e.label] for e in batch], device=device)
        return F.cross_entropy(logits, target)
    # VQA as ViLT trains it: binary cross-entropy against each answer's soft score, summed over answers
    target = torch.zeros_like(logits)
    for row, example in enumerate(batch):
        for answer, score in example.scores.items():
            if answer in task.label_index:
                target[row, task.label_index[answer]] = score
    return F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]


def _distillation(encoded, text: TextBatch, heads: Projections, targets: Targets, rows: torch.Tensor, select: bool,
                  weigh: bool, params: FinetuneParams, device: torch.device) -> torch.Tensor:
    """lambda-free CLIP-TD term of a batch: words and image cells, selected and weighted as the variant says."""
    words, word_valid = _word_states(encoded.text, text.word_ids)
    target_words = targets.words[rows].to(device)
    width = min(words.shape[1], target_words.shape[1])
    words, target_words = words[:, :width], target_words[:, :width]
    has_target = torch.arange(width, device=device) < targets.word_counts[rows, None].to(device)
    word_valid = word_valid[:, :width] & has_target
    cells, target_cells = _aligned_cells(encoded.patches, targets.cells[rows].to(device), targets.grid)
    cell_valid = torch.ones(cells.shape[:2], dtype=torch.bool, device=device)
    if select:
        word_valid = top_k(relevance(target_words, targets.image[rows].to(device)), word_valid, params.text_tokens)
        cell_valid = top_k(relevance(target_cells, targets.text[rows].to(device)), cell_valid, params.image_tokens)
    weights = targets.weight[rows].to(device) if weigh else torch.ones(len(rows), device=device)
    distances = [token_distance(heads.text(words), target_words, params.distance),
                 token_distance(heads.image(cells), target_cells, params.distance)]
    return distillation_loss(distances, [word_valid, cell_valid], weights)


def _word_states(tokens: torch.Tensor, word_ids: torch.Tensor):
    """([N, W, H] the mean hidden state of each word's tokens, [N, W] which words exist)."""
    count = int(word_ids.max()) + 1 if word_ids.numel() else 0
    one_hot = (word_ids[..., None] == torch.arange(max(count, 1), device=tokens.device)).to(tokens.dtype)
    sizes = one_hot.sum(1)  # [N, W]
    states = torch.einsum("ntw,nth->nwh", one_hot, tokens) / sizes.clamp(min=1)[..., None]
    return states, sizes > 0


def _aligned_cells(patches: torch.Tensor, target_cells: torch.Tensor, grid: tuple[int, int]):
    """Student patches [N, H, r, c] and teacher cells [N, G, D] on one grid: the finer of the two average-pooled
    to the coarser. Returns ([N, M, H], [N, M, D])."""
    rows, columns = min(patches.shape[2], grid[0]), min(patches.shape[3], grid[1])
    student = F.adaptive_avg_pool2d(patches, (rows, columns)).flatten(2).transpose(1, 2)
    teacher = target_cells.transpose(1, 2).reshape(target_cells.shape[0], -1, *grid)
    teacher = F.adaptive_avg_pool2d(teacher, (rows, columns)).flatten(2).transpose(1, 2)
    return student, teacher


@torch.inference_mode()
def evaluate(model, order: PatchOrder, task: TaskData, split: Split, batch_size: int, device: torch.device) -> dict:
    """VQA: the official accuracy (overall and per question type) of the top answer; VE: accuracy per label."""
    predicted = []
    for start in range(0, len(split.examples), batch_size):
        batch = split.examples[start:start + batch_size]
        text, pixels = task.inputs(batch, device)
        logits = model.classifier(encode(model.vilt, order, text, pixels).pooled)
        predicted += [task.labels[i] for i in logits.argmax(-1).tolist()]
    if task.kind == "vqa":
        keys = [int(e.id) if e.id.isdigit() else e.id for e in split.examples]  # the annotations' question_id
        accuracies = {key: question_accuracy(split.annotations[key]["answers"], answer)
                      for key, answer in zip(keys, predicted, strict=True)}
        result = aggregate(split.annotations, accuracies)
        return {"score": result["overall"], "perQuestionType": result["perQuestionType"]}
    right = [e.label == answer for e, answer in zip(split.examples, predicted, strict=True)]
    per_label = {label: round(100 * sum(r for r, e in zip(right, split.examples, strict=True) if e.label == label)
                              / max(1, sum(e.label == label for e in split.examples)), 2) for label in task.labels}
    return {"score": round(100 * sum(right) / len(right), 2), "perLabel": per_label}



