"""The ladder of ceilings: the same VQA questions answered from better evidence than the student's image
prefix, scored with the same official metric, so a scorecard says where a point is lost.

From the top:
  description  the language model before distillation reads the image's true, complete description
               ("<description>. <vqa prompt>"), where the benchmark has one (`descriptions`: the embedded
               world's scene records in words). What a student that read the image perfectly, and then
               answered as its language model does, could reach.
  captions     the language model reads the image's human reference captions (`captions`: COCO caption
               annotations of the benchmark's images; VQAv2's and OK-VQA's images are COCO's). What a student
               that read the image as well as a person describes it could reach.
  aligned      (not computed here) a student distilled with `distill.aligned_teacher`: the caption's text
               embedding in place of the image's, so that distillation is measured without the teacher.
  student      the student with the real teacher (each VQA mode), and under it the controls (blank,
               shuffled, text only, prior).

The language model reads each rung with forced decoding (`evaluate.decoding: forced`), whatever the student's
decoding: a rung is a ceiling, and the embedded language model does not rewrite a context of several captions
faithfully, so reading the answer out of its free rewrite measured the captions rung 24 points lower (41.07
against 65.30; docs/experiments.md). A rung the benchmark has no file for is left out.

`gap_closed` = (student - blank) / (rung - blank): the share of the way from the blank-image control to the
rung that the student covers, overall and per question type.

Captions are joined in the annotations' order, as many whole captions as fit the language model's trained
length with the prompt and the answer (past it a model reads noise, and past its positions it cannot read);
a description too long for it is cut. How many images' evidence was shortened is recorded.

A rung's answers depend on the language model and the evidence, not on the student, yet every evaluation of a
new student would read them again (half of the embedded world's evaluation). They are kept in the evaluation
cache under everything they are computed from (the language model's files, the contexts read, the decoding
settings, the code and the libraries' versions), so a changed input recomputes them, as the stage would.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlkd.config import BenchmarkSpec
from vlkd.data.vqa_metric import read_json, score_vqa
from vlkd.errors import VlkdError
from vlkd.inference.answering import Generator
from vlkd.io import write_json_atomic
from vlkd.models.language_model import MANIFEST as PLM_MANIFEST
from vlkd.record import content_hash, fingerprint, library_versions, stage_code

log = logging.getLogger(__name__)

def reading_rungs(name: str, spec: BenchmarkSpec, usable: list[dict], prompts: list[str], questions: dict,
                  annotations: dict, answerer: Generator, plm_folder: Path, normalize: str,
                  cache: Path | None = None) -> dict[str, dict]:
    """{rung: score_vqa's result, with its "predictions"} for each rung the benchmark has a file for.
    Questions whose image has no text in the file are answered with nothing (scored 0) and
    counted in "images_without_text". `cache`: a folder that keeps the rungs' answers (None: always read)."""
    evidence = {}
    if spec.descriptions is not None:
        evidence["description"] = {i: [text] for i, text in read_descriptions(spec.descriptions).items()}
    if spec.captions is not None:
        evidence["captions"] = read_references(spec.captions)
    bart, tokenizer = answerer.plm
    prompt_tokens = max((len(tokenizer(prompt).input_ids) for prompt in prompts), default=0)
    # the rewrite of the context, answer included, within what the language model was trained on
    length = reading_length(plm_folder, tokenizer, bart) - answerer.max_new_tokens
    texts, shortened = {}, {}
    for rung, segments in evidence.items():
        fitted = {i: fitted_evidence(parts, tokenizer, prompt_tokens, length) for i, parts in segments.items()}
        texts[rung] = {i: text for i, (text, _) in fitted.items()}
        shortened[rung] = sum(cut for _, cut in fitted.values())
    results = {}
    for rung, by_image in texts.items():
        asked = [(record, f"{by_image[record['image_id']].rstrip('. ')}. {prompt}")
                 for record, prompt in zip(usable, prompts, strict=True) if record["image_id"] in by_image]
        answers = read_answers([context for _, context in asked], answerer, plm_folder, cache, f"{name} {rung}")
        by_id = {record["question_id"]: answer for (record, _), answer in zip(asked, answers, strict=True)}
        predictions = [{"question_id": q["question_id"], "answer": by_id.get(q["question_id"], "")}
                       for q in questions["questions"]]
        missing = len({q["image_id"] for q in questions["questions"]} - by_image.keys())
        if missing:
            log.warning("%s: %d image(s) have no text for the %s rung; their questions score 0", name, missing, rung)
        results[rung] = score_vqa(questions, annotations, predictions, normalize,
                                  sources={"questions": str(spec.questions), "annotations": str(spec.annotations),
                                           "predictions": f"{name} {rung} predictions"})
        results[rung] |= {"images_without_text": missing, "images_shortened": shortened[rung],
                          "predictions": predictions}
        log.info("%s %s rung: VQA accuracy %.2f", name, rung, results[rung]["overall"])
    return results


def read_answers(contexts: list[str], answerer: Generator, plm_folder: Path, cache: Path | None,
                 what: str) -> list[str]:
    """The language model's answers to `contexts`, from `cache` when they were read before from the same
    inputs; a language model without local files (a hub name) is always read."""
    model = content_hash(plm_folder)
    if cache is None or model is None:
        return answerer.answers(contexts, None, what)
    key = fingerprint({"language_model": model, "contexts": contexts, "num_beams": answerer.asking.num_beams,
                       "batch_size": answerer.asking.batch_size, "decoding": answerer.asking.decoding,
                       "max_new_tokens": answerer.max_new_tokens, "code": stage_code([__name__]),
                       "libraries": library_versions()})
    path = Path(cache) / f"{key[:24]}.json"
    if path.is_file():
        saved = read_json(path)
        if saved.get("key") == key and len(saved.get("answers", ())) == len(contexts):
            log.info("%s: the language model's answers to the same %d contexts reused from %s", what,
                     len(contexts), path)
            return saved["answers"]
    answers = answerer.answers(contexts, None, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"key": key, "answers": answers})
    return answers


def gap_closed(score: dict, blank: dict, rung: dict, per_question_type: bool) -> dict:
    """(score - blank) / (rung - blank), overall and (optionally) per question type; None where the rung is
    not above the blank control (there is no gap to close)."""
    def share(value: float, low: float, high: float) -> float | None:
        return round((value - low) / (high - low), 4) if high - low > 1e-9 else None

    result = {"overall": share(score["overall"], blank["overall"], rung["overall"])}
    if per_question_type:
        result["perQuestionType"] = {
            kind: share(value, blank["perQuestionType"].get(kind, 0.0), rung["perQuestionType"].get(kind, 0.0))
            for kind, value in score["perQuestionType"].items()}
    return result


def read_descriptions(path: Path) -> dict[int, str]:
    """{image_id: description} from a JSON list of {"image_id", "description"}."""
    records = read_json(path)
    if not isinstance(records, list) or not all(isinstance(r, dict) and {"image_id", "description"} <= r.keys()
                                                 for r in records):
        raise VlkdError(f"{path} is not a list of {{\"image_id\", \"description\"}} records; write one record per "
                        "image, or remove the benchmark's `descriptions`")
    return {record["image_id"]: " ".join(str(record["description"]).split()) for record in records}


def read_references(path: Path) -> dict[int, list[str]]:
    """{image_id: [caption, ...]} from COCO caption annotations, in the file's order."""
    data = read_json(path)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise VlkdError(f"{path} has no \"annotations\" list; use the COCO captions format")
    references: dict[int, list[str]] = {}
    for annotation in annotations:
        references.setdefault(annotation["image_id"], []).append(" ".join(str(annotation["caption"]).split()))
    return references


def fitted_evidence(segments: list[str], tokenizer, prompt_tokens: int, length: int) -> tuple[str, bool]:
    """`segments` (captions, or one description) joined with ". ", as many whole ones as fit `length` tokens
    with a prompt of `prompt_tokens`; if the first alone does not fit, its first words that do. Returns the
    text and whether anything was left out."""
    def fits(text: str) -> bool:  # both counts hold <s> and </s>, which the context holds once
        return len(tokenizer(text + ".").input_ids) + prompt_tokens - 2 <= length

    kept: list[str] = []
    for segment in (" ".join(s.split()).rstrip(". ") for s in segments):
        if not fits(". ".join(kept + [segment])):
            break
        kept.append(segment)
    if kept:
        return ". ".join(kept), len(kept) < len(segments)
    words = " ".join(segments[0].split()).rstrip(". ").split()
    while len(words) > 1 and not fits(" ".join(words)):
        words.pop()
    return " ".join(words), True


def reading_length(plm_folder: Path, tokenizer, bart) -> int:
    """The longest input the language model was trained on: vlkd's language model records it
    (plm.max_length); a pretrained tokenizer states it; else the model's positions."""
    manifest = Path(plm_folder) / PLM_MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text()).get("params", {}).get("max_length")
        if recorded:
            return int(recorded)
    stated = getattr(tokenizer, "model_max_length", None)
    if isinstance(stated, int) and stated < 1_000_000:
        return stated
    return bart.config.max_position_embeddings
