"""CLIP-TD's parts: which tokens are distilled (selection), how much each instance counts (weight), and the
loss through projection heads that exist only during training.

Our reading (docs/method.md): the paper's exact rules were not published as code.
- relevance of a student token: the cosine between its teacher target and the other modality's teacher
  embedding (a word against the image, an image cell against the text);
- selection: the top-k words and top-k cells per instance by relevance, never padding or special tokens;
- weight: the teacher's zero-shot confidence in the gold label, detached;
- loss: task loss + lambda * w(x) * mean over the selected tokens of the distance between P(student token)
  and its target (L1 between normalised vectors by default).
The variants are the same loss with parts switched off (VARIANT_RULES).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

# variant -> (distil at all, select the top-k, weight by the teacher's confidence)
VARIANT_RULES = {
    "none": (False, False, False),
    "naive": (True, False, False),  # every token, weight 1
    "clip-td": (True, True, True),
    "select-only": (True, True, False),
    "weight-only": (True, False, True),
}


def relevance(targets: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[N, M] cosine of each token's target [N, M, D] with the other modality's embedding [N, D]."""
    return torch.einsum("nmd,nd->nm", F.normalize(targets, dim=-1), F.normalize(other, dim=-1))


def top_k(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """[N, M] mask of the k highest-scoring valid tokens per row (all valid ones when fewer than k)."""
    masked = scores.masked_fill(~valid, float("-inf"))
    chosen = masked.topk(min(k, scores.shape[1]), dim=1).indices
    mask = torch.zeros_like(valid).scatter(1, chosen, True)
    return mask & valid


def token_distance(student: torch.Tensor, target: torch.Tensor, distance: str) -> torch.Tensor:
    """[N, M] distance between projected student tokens and their targets, both L2-normalised."""
    student, target = F.normalize(student, dim=-1), F.normalize(target, dim=-1)
    if distance == "l1":
        return (student - target).abs().sum(-1)
    if distance == "mse":
        return (student - target).pow(2).sum(-1)
    return 1 - (student * target).sum(-1)


def distillation_loss(distances: list[torch.Tensor], masks: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """The batch mean of w(x) times the mean distance over x's selected tokens (of every modality)."""
    total = sum((d * m).sum(1) for d, m in zip(distances, masks, strict=True))
    count = sum(m.sum(1) for m in masks).clamp(min=1)
    return (weights * total / count).mean()


# -- the weight: the teacher's zero-shot confidence in the gold label ---------------------------------------
@torch.inference_mode()
def vqa_confidence(model, tokenizer, examples, labels: list[str], candidate: str, image: torch.Tensor,
                   temperature: float, device: torch.device, batch_size: int) -> torch.Tensor:
    """softmax over the answer vocabulary of cos(image, candidate text) / T, at the gold answer; a gold
    answer outside the vocabulary gets weight 0 (the classifier cannot predict it either). A template
    without {question} embeds each answer once."""
    index = {label: i for i, label in enumerate(labels)}
    gold = torch.tensor([index.get(example.label, -1) for example in examples])
    weights = torch.zeros(len(examples))
    if "{question}" not in candidate:
        texts = _embed(model, tokenizer, [candidate.format(answer=a) for a in labels], device, batch_size)
        probabilities = (image @ texts.T / temperature).softmax(1)
        weights[gold >= 0] = probabilities[gold >= 0].gather(1, gold[gold >= 0, None])[:, 0]
        return weights
    # one question's candidates per row of the softmax; whole questions per text batch
    per_batch = max(1, batch_size // len(labels))
    for start in range(0, len(examples), per_batch):
        rows = [r for r in range(start, min(start + per_batch, len(examples))) if gold[r] >= 0]
        if not rows:
            continue
        texts = _embed(model, tokenizer, [candidate.format(question=examples[r].text, answer=a)
                                          for r in rows for a in labels], device, batch_size)
        logits = torch.einsum("qad,qd->qa", texts.view(len(rows), len(labels), -1), image[rows]) / temperature
        weights[rows] = logits.softmax(1).gather(1, gold[rows, None])[:, 0]
    return weights


def ve_confidence(examples, similarity: torch.Tensor, temperature: float) -> torch.Tensor:
    """Over the hypotheses written for the same premise (SNLI-VE has one of each label per caption): an
    entailment's weight is the teacher's probability that it is the best match for the image (softmax of
    cos / T), a contradiction's that it is the worst (softmax of -cos / T), a neutral's the rest."""
    groups = defaultdict(list)
    for row, example in enumerate(examples):
        groups[example.group].append(row)
    weights = torch.zeros(len(examples))
    for rows in groups.values():
        scores = similarity[rows] / temperature
        best, worst = scores.softmax(0), (-scores).softmax(0)
        for position, row in enumerate(rows):
            label = examples[row].label
            weights[row] = (best[position] if label == "entailment" else worst[position] if label == "contradiction"
                            else (1 - best[position] - worst[position]).clamp(min=0))
    return weights


def _embed(model, tokenizer, texts: list[str], device: torch.device, batch_size: int) -> torch.Tensor:
    out = [model.encode_text(tokenizer(texts[s:s + batch_size]).to(device)) for s in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1).cpu()
