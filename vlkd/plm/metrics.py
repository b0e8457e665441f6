"""The language model's metrics: the held-out infilling loss, and QA accuracy on held-out questions asked
with the scene's description ("<description>. Question: {q} Answer: <mask>", the documents' own format)
and without it (the blind baseline: what the model guesses from the question alone). Answers come from
beam search, as the evaluate stage generates them, and `extract_infill`."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from vlkd.config import PlmParams
from vlkd.data.text import qa_pairs, read_documents
from vlkd.models.infill import extract_infill, fill_prompt, generate_texts
from vlkd.models.language_model import EVAL_BATCH, infilling_loss

log = logging.getLogger(__name__)

QA_PROMPT = "Question: {question} Answer: <mask>"  # evaluate.vqa_prompt's default, the documents' own format
QA_BEAMS = 5
QA_EXTRA_TOKENS = 10  # new tokens beyond the prompt's length: BART writes the whole prompt again


def evaluate_plm(model, tokenizer, params: PlmParams, device: torch.device | str = "cpu") -> dict:
    """Held-out infilling loss and text-only QA on `params.heldout` (skipped, with a reason, without it)."""
    if params.heldout is None or not Path(params.heldout).is_file():
        why = "plm.heldout is null" if params.heldout is None else f"{params.heldout} does not exist"
        log.warning("held-out metrics not measured: %s (set plm.heldout)", why)
        return {"heldout_infilling": {"skipped": why}, "qa": {"skipped": why}}
    path = Path(params.heldout)
    documents = read_documents(path, "plm.heldout")
    return {
        "heldout_infilling": infilling_loss(model, tokenizer, documents, params.mask_ratio, params.poisson_lambda,
                                            params.max_length, device=device),
        "qa": text_qa(model, tokenizer, documents, params.qa_questions, params.seed, device=device),
    }


def text_qa(model, tokenizer, documents: list[str], sample: int, seed: int = 0,
            device: torch.device | str = "cpu") -> dict:
    """Accuracy (exact match, case and surrounding punctuation ignored) of answering held-out questions
    from text: with the scene's description in front of the prompt, and without it (blind). At most
    `sample` questions, drawn with `seed`."""
    questions = [(description, question, answer) for description, pairs in map(qa_pairs, documents)
                 for question, answer, _, _ in pairs if description]
    if not questions:
        return {"skipped": "no questions in the held-out documents"}
    available = len(questions)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(available, size=min(sample, available), replace=False).tolist())
    questions = [questions[i] for i in chosen]
    result = {"questions": len(questions), "available": available, "prompt": QA_PROMPT, "num_beams": QA_BEAMS,
              "max_new_tokens": f"prompt tokens + {QA_EXTRA_TOKENS}",
              "match": "exact, case and end punctuation ignored"}
    for setting, with_description in (("with_description", True), ("blind", False)):
        prompts = [(f"{description}. " if with_description else "") + fill_prompt(QA_PROMPT, question=question)
                   for description, question, _ in questions]
        predictions = generate_infills(model, tokenizer, prompts, device=device)
        result[setting] = _accuracy(questions, predictions)
        result[setting]["examples"] = [{"prompt": prompt, "answer": answer, "predicted": predicted}
                                       for prompt, (_, _, answer), predicted in
                                       list(zip(prompts, questions, predictions, strict=True))[:5]]
    return result


def _accuracy(questions: list[tuple[str, str, str]], predictions: list[str]) -> dict:
    """Overall exact-match accuracy and per question type (the question's first two words, as VQA's
    question types are its first words)."""
    right: dict[str, list[bool]] = defaultdict(list)
    for (_, question, answer), predicted in zip(questions, predictions, strict=True):
        kind = " ".join(question.lower().split()[:2])
        right[kind].append(_clean(predicted) == _clean(answer))
    every = [hit for hits in right.values() for hit in hits]
    return {"accuracy": round(sum(every) / len(every), 4),
            "per_question_type": {kind: round(sum(hits) / len(hits), 4) for kind, hits in sorted(right.items())}}


def _clean(answer: str) -> str:
    return answer.lower().strip().strip(".!?,;:").strip()


@torch.no_grad()
def generate_infills(model, tokenizer, prompts: list[str], num_beams: int = QA_BEAMS,
                     extra_tokens: int = QA_EXTRA_TOKENS, batch_size: int = EVAL_BATCH,
                     device: torch.device | str = "cpu") -> list[str]:
    """What the model writes in place of each prompt's `<mask>`: beam search over batches of prompts of
    similar length, at most (the batch's longest prompt + `extra_tokens`) new tokens."""
    model.eval()
    device = torch.device(device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[str] = [""] * len(prompts)
    for begin in range(0, len(order), batch_size):
        indices = order[begin:begin + batch_size]
        batch = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True).to(device)
        texts = generate_texts(model, tokenizer, dict(batch), num_beams, batch["input_ids"].shape[1] + extra_tokens)
        for i, text in zip(indices, texts, strict=True):
            results[i] = extract_infill(prompts[i], text)
    return results
