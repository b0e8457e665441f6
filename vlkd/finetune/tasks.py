"""The fine-tuning tasks in their published formats, read into examples.

- vqa: VQAv2 questions + annotations files. The label set is the `answer_vocabulary` most frequent
  `multiple_choice_answer`s of the training split (VQAv2's usual 3,129); the target of a question is
  VQA's soft score per answer, min(1, humans who gave it / 3), as ViLT and most VQA classifiers train.
- ve: SNLI-VE jsonl (`Flickr30K_ID`, `sentence2` the hypothesis, `gold_label`); the premise is the image.
  Rows without a consensus label (SNLI's "-") are counted and skipped.

A file in the wrong format stops the stage with one line; an example whose image is missing is counted,
named in a warning and skipped.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vlkd.config import TaskSpec, TaskSplit
from vlkd.data.vqa_metric import annotation_records, check_questions, normalize_answer, read_json, records_under
from vlkd.errors import VlkdError

log = logging.getLogger(__name__)

VE_LABELS = ("entailment", "neutral", "contradiction")


@dataclass(frozen=True)
class Example:
    id: str  # question_id or pairID
    image: Path
    text: str  # the question or the hypothesis
    label: str  # the most common answer or the gold label
    scores: dict[str, float] = field(default_factory=dict)  # vqa: soft score per answer (normalised)
    group: str = ""  # ve: the premise (captionID) its hypotheses were written for


@dataclass
class Split:
    examples: list[Example]
    skipped: dict[str, int]  # reason -> count
    annotations: dict | None = None  # vqa: {question_id: annotation}, for the official metric


def read_split(kind: str, split: TaskSplit, where: str) -> Split:
    return _read_vqa(split, where) if kind == "vqa" else _read_ve(split, where)


def labels_of(spec: TaskSpec, train: Split, vocabulary: int) -> list[str]:
    """The classifier's labels: VE's three, or the most frequent training answers (ties by name)."""
    if spec.task == "ve":
        return list(VE_LABELS)
    counts = Counter(example.label for example in train.examples)
    return [answer for answer, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:vocabulary]]


def _image(split: TaskSplit, image_id, where: str) -> Path:
    """The image file of an id. SNLI-VE's ids are strings of digits: they are formatted as numbers, so one
    pattern such as "{image_id:06d}.png" or "{image_id}.jpg" serves both formats."""
    if isinstance(image_id, str) and image_id.isdigit():
        image_id = int(image_id)
    try:
        name = split.image_pattern.format(image_id=image_id)
    except (ValueError, KeyError, IndexError) as err:
        raise VlkdError(f"image_pattern {split.image_pattern!r} of {where} cannot name image {image_id!r} ({err}); "
                        "write it with {image_id}, e.g. \"{image_id:06d}.png\"") from err
    return Path(split.images) / name


def _present(examples: list[Example], skipped: Counter, where: str) -> list[Example]:
    missing = [example for example in examples if not example.image.is_file()]
    if missing:
        log.warning("%d example(s) of %s have no image file and are skipped, e.g. %s (%s)", len(missing), where,
                    missing[0].id, missing[0].image)
        skipped["image file missing"] += len(missing)
    return [example for example in examples if example.image.is_file()]


def _read_vqa(split: TaskSplit, where: str) -> Split:
    annotations_where, questions_where = f"{where} annotations ({split.annotations})", f"{where} ({split.questions})"
    records = annotation_records(read_json(Path(split.annotations)), annotations_where)
    questions = read_json(Path(split.questions))
    check_questions(questions, records, questions_where, annotations_where)
    examples = []
    for entry in records_under(questions, "questions", questions_where, "the VQA questions format"):
        record = records[entry["question_id"]]
        if "question" not in entry or "image_id" not in entry:
            raise VlkdError(f"question {entry['question_id']} in {questions_where} has no 'question' or 'image_id'; "
                            "expected VQAv2's questions format")
        given = Counter(normalize_answer(answer["answer"]) for answer in record["answers"])
        label = normalize_answer(record.get("multiple_choice_answer") or given.most_common(1)[0][0])
        examples.append(Example(str(entry["question_id"]), _image(split, entry["image_id"], where), entry["question"],
                                label, {answer: min(1.0, count / 3) for answer, count in given.items()}))
    skipped: Counter = Counter()
    return Split(_present(examples, skipped, where), dict(skipped), records)


def _read_ve(split: TaskSplit, where: str) -> Split:
    path = Path(split.file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise VlkdError(f"{where} file {path} does not exist; check the path") from err
    examples, skipped = [], Counter()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise VlkdError(f"line {number} of {path} is not JSON ({err.msg}); expected SNLI-VE jsonl, one object "
                            "per line") from err
        if not isinstance(row, dict) or not all(key in row for key in ("Flickr30K_ID", "sentence2", "gold_label")):
            raise VlkdError(f"line {number} of {path} lacks Flickr30K_ID, sentence2 or gold_label; expected "
                            "SNLI-VE jsonl")
        if row["gold_label"] not in VE_LABELS:
            skipped[f"gold_label {row['gold_label']!r}"] += 1
            continue
        example_id = str(row.get("pairID", f"{path.name}:{number}"))
        examples.append(Example(example_id, _image(split, row["Flickr30K_ID"], where), row["sentence2"],
                                row["gold_label"], group=str(row.get("captionID", row["Flickr30K_ID"]))))
    if not examples and not skipped:
        raise VlkdError(f"{path} holds no SNLI-VE rows; check the file")
    for reason, count in skipped.items():
        log.warning("%d row(s) of %s skipped: %s (not one of %s)", count, path, reason, ", ".join(VE_LABELS))
    return Split(_present(examples, skipped, where), dict(skipped))
