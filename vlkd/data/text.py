"""Text as the language model is trained on it: documents (one per line), the questions a document holds,
BART's text-infilling examples (random spans, or every answer masked), batches of similar length.
The plm stage pretrains on these, distillation's retention term and evaluation's held-out loss reuse them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlkd.data.noising import infill_spans
from vlkd.errors import VlkdError

BUCKET_BATCHES = 50  # batches drawn from one length-sorted pool of shuffled documents
QA_PAIR = re.compile(r"Question:\s*(?P<question>.+?)\s+Answer:\s*(?P<answer>.*?)\s*(?=Question:|$)")


def read_documents(path: Path, field: str) -> list[str]:
    """The non-empty lines of a text file, whitespace collapsed."""
    if not path.is_file():
        raise VlkdError(f"{field} {path} does not exist; run `vlkd synth` or point {field} at a text file "
                        "with one document per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise VlkdError(f"cannot read {field} {path} ({err}); it must be a UTF-8 text file") from err
    documents = [" ".join(line.split()) for line in lines if line.strip()]
    if not documents:
        raise VlkdError(f"{field} {path} has no text (empty or blank lines only); give one document per line")
    return documents


@dataclass
class Encoded:
    """One document as token ids (no BOS/EOS) and the token span of every answer: [start, end)."""

    tokens: list[int]
    answers: list[tuple[int, int]]


def qa_pairs(document: str) -> tuple[str, list[tuple[str, str, int, int]]]:
    """(description, [(question, answer, answer start char, answer end char)]) of a document; a plain
    caption is all description. The description loses its final period."""
    pairs = [(m["question"], m["answer"], m.start("answer"), m.end("answer"))
             for m in QA_PAIR.finditer(document) if m["answer"]]
    first = QA_PAIR.search(document)
    description = document[:first.start()] if first else document
    return description.strip().rstrip(".").strip(), pairs


def encode_documents(tokenizer, documents: list[str], max_length: int) -> list[Encoded]:
    """Token ids truncated to `max_length` tokens with BOS and EOS; answers cut by truncation are dropped."""
    batch = tokenizer(documents, add_special_tokens=False, return_offsets_mapping=True)
    limit = max_length - 2
    encoded = []
    for document, ids, offsets in zip(documents, batch["input_ids"], batch["offset_mapping"], strict=True):
        ids, offsets = ids[:limit], offsets[:limit]
        answers = []
        for _, _, begin, end in qa_pairs(document)[1]:
            inside = [i for i, (start, stop) in enumerate(offsets) if start >= begin and stop <= end and stop > start]
            if inside and inside[-1] - inside[0] + 1 == len(inside) and inside[-1] < len(ids):
                answers.append((inside[0], inside[-1] + 1))
        encoded.append(Encoded(list(ids), answers))
    return encoded


@dataclass(frozen=True)
class Noise:
    """How a document is noised for infilling: random spans (`mask_ratio` of the tokens, span lengths
    Poisson(`poisson_lambda`)), or for a share `answer_mask_share` of the documents with questions, every
    answer masked."""

    mask_ratio: float
    poisson_lambda: float
    answer_mask_share: float = 0.0


def make_example(doc: Encoded, tokenizer, noise: Noise,
                 rng: np.random.Generator) -> tuple[list[int], list[int], str]:
    """(encoder input, labels, "answers" or "spans") of one document, both with BOS and EOS; the labels are
    the whole document. For a share `answer_mask_share` of the documents with questions every answer (the
    words after "Answer:") becomes one `<mask>`; otherwise random spans are masked."""
    bos, eos, mask = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id
    target = [bos, *doc.tokens, eos]
    if doc.answers and rng.random() < noise.answer_mask_share:
        source, last = [bos], 0
        for start, end in doc.answers:
            source += [*doc.tokens[last:start], mask]
            last = end
        return [*source, *doc.tokens[last:], eos], target, "answers"
    return [bos, *infill_spans(doc.tokens, mask, noise.mask_ratio, noise.poisson_lambda, rng), eos], target, "spans"


def length_batches(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Indices in batches of documents of similar length: shuffle, sort pools of `BUCKET_BATCHES` batches by
    length, cut them into batches, shuffle the batches."""
    order = rng.permutation(len(lengths))
    pool = batch_size * BUCKET_BATCHES
    batches = []
    for begin in range(0, len(order), pool):
        chunk = sorted(order[begin:begin + pool].tolist(), key=lambda index: lengths[index])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded encoder inputs and labels (-100 on padding: BART shifts labels into decoder inputs)."""
    width_in = max(len(source) for source, _ in examples)
    width_out = max(len(target) for _, target in examples)
    input_ids = torch.full((len(examples), width_in), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width_out), -100, dtype=torch.long)
    for row, (source, target) in enumerate(examples):
        input_ids[row, :len(source)] = torch.tensor(source)
        labels[row, :len(target)] = torch.tensor(target)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": labels}
