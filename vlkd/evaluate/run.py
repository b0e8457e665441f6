"""`vlkd evaluate`: zero-shot VQA and captioning of a student, with controls, text retention and a report.

For every benchmark of `params.yaml` (public formats: VQAv2/OK-VQA questions + annotations, COCO
captions), the same prompts are answered under several conditions, in one run:

  image       the student with each image's own teacher features (the result)
  blank       the student with the features of one blank grey image for every question
  shuffled    the student with the features of another image of the split (VQA)
  text_only   the language model before distillation, no image (what text alone gets right)
  prior       no model: each question gets its question type's most frequent human answer (VQA)

VQA is asked in each of `vqa_modes` under every condition: `direct` (the paper's: the student answers
[image prefix ; question prompt]) and `describe` (the student describes the image, the language model
before distillation answers from the description). The first mode is the benchmark's headline.

Answers are what the model writes in place of the prompt's `<mask>` (`extract_infill`), scored with the
official VQA accuracy and pycocoevalcap. Text retention: BART's infilling loss on held-out text, before
(the language model) and after (the student) distillation, with identical noise.

Outputs in `output`: `<benchmark>/predictions*.json` in the official result formats (another VQA mode's
in `<benchmark>/<mode>/`), `metrics.json`, `report.html`, `evaluate.json` and the run's record
(`vlkd.record`); a rerun whose record matches is skipped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vlkd.config import BENCHMARK_FILES, BenchmarkSpec, EvaluateParams
from vlkd.data.text import read_documents
from vlkd.data.vqa_metric import question_type_prior, read_json, score_vqa
from vlkd.errors import VlkdError
from vlkd.evaluate.caption_metric import score_captions
from vlkd.evaluate.images import caption_features, image_features
from vlkd.evaluate.ladder import gap_closed, reading_rungs
from vlkd.evaluate.recipe import student_recipe
from vlkd.evaluate.report import caption_samples, vqa_samples, write_report
from vlkd.inference.answering import (
    FeatureRows,
    Generator,
    described_answers,
    long_tensor,
)
from vlkd.inference.asking import Asking
from vlkd.io import building_folder, write_json_atomic
from vlkd.models.infill import fill_prompt
from vlkd.models.language_model import infilling_loss, language_model_text
from vlkd.models.student import PROJECTIONS, STUDENT_CONFIG, Student, load_language_model
from vlkd.models.teacher import check_teacher, load_teacher, resolve_teacher
from vlkd.record import StageRecord
from vlkd.training import resolve_device

log = logging.getLogger(__name__)

MANIFEST = "evaluate.json"
METRICS = "metrics.json"
VQA_CONTROLS = ("blank", "shuffled", "text_only", "prior")
CAPTION_CONTROLS = ("blank", "text_only")
RETENTION_MAX_TOKENS = 128


def evaluate(params: EvaluateParams) -> dict:
    """Evaluate the student on every benchmark; returns metrics.json's content."""
    record = StageRecord.of("evaluate", __name__, params, stage_inputs(params), params.output / MANIFEST)
    if record.reusable(params.output):
        log.info("evaluation in %s is up to date with its record; skipped", params.output)
        return read_json(params.output / METRICS)
    device = resolve_device(params.device, "evaluate.device")
    student = Student.from_pretrained(params.student, device)
    # The image tokens exactly as the student's features were made (the grid is in the teacher's fingerprint).
    teacher = load_teacher(*resolve_teacher(params.teacher), device=device,
                           image_tokens=student.config.prefix == "patch",
                           token_grid=student.config.teacher.get("token_grid"))
    check_teacher(student.config.teacher, teacher.fingerprint.as_dict(), where=f"the teacher {params.teacher}")
    bart, tokenizer = load_language_model(params.plm, "evaluate.plm")
    plm = (bart.to(device).eval(), tokenizer)
    metrics, samples = {"recipe": student_recipe(params.student)}, {}
    with building_folder(params.output, MANIFEST, "evaluation", "evaluate.output") as building:
        for name, spec in params.benchmarks.items():
            run = _vqa if spec.task == "vqa" else _captions
            metrics[name], samples[name] = run(name, spec, student, plm, teacher, params, building / name)
        name, spec = next(iter(params.benchmarks.items()))
        blank = _benchmark_features(name, spec, [], teacher, student, params)[1]
        metrics["retention"] = _retention(params, student, plm, device, blank)
        write_json_atomic(building / METRICS, metrics)
        write_report(building / "report.html", metrics, samples, params)
        write_json_atomic(building / MANIFEST, {"metrics": metrics})
        record.write(building)
    return metrics


def _vqa(name: str, spec: BenchmarkSpec, student: Student, plm: tuple, teacher, params: EvaluateParams,
         folder: Path) -> tuple[dict, list]:
    questions, annotations = read_json(spec.questions), read_json(spec.annotations)
    records = questions.get("questions") if isinstance(questions, dict) else None
    if not isinstance(records, list):
        raise VlkdError(f"{spec.questions} has no \"questions\" list; use the VQAv2 questions format")
    image_ids = sorted({record["image_id"] for record in records})
    table, row_of = _per_image_table(*_benchmark_features(name, spec, image_ids, teacher, student, params))
    usable = [record for record in records if record["image_id"] in row_of]
    prompts = [fill_prompt(params.vqa_prompt, question=record["question"]) for record in usable]
    conditions = _vqa_conditions(table, row_of, usable, _derangement(image_ids, params.seed))
    prior = question_type_prior(annotations, str(spec.annotations))
    prior_result = score_vqa(questions, annotations, prior, params.normalize)
    runs = {}
    for mode in params.vqa_modes:
        run = _vqa_mode(mode, name, spec, questions, annotations, records, usable, prompts, conditions, student,
                        plm, params)
        run.predictions["prior"], run.results["prior"] = prior, prior_result
        _write_vqa_files(mode_folder(folder, mode, params.vqa_modes), run)
        runs[mode] = run
    # the language model alone, forced to the prompt whatever evaluate.decoding: a rung is a ceiling (ladder.py)
    reader = Generator(student, plm, replace(Asking.of(params), decoding="forced"), params.vqa_max_new_tokens)
    rungs = reading_rungs(name, spec, usable, prompts, questions, annotations, reader, params.plm, params.normalize,
                          params.cache / name / "ladder")
    _write_predictions(folder / "ladder", {rung: result.pop("predictions") for rung, result in rungs.items()})
    headline = runs[params.vqa_modes[0]]
    metrics = {**_mode_metrics(headline.results, rungs, per_question_type=True), **_fidelity(headline),
               "mode": params.vqa_modes[0],
               "questions": len(records), "images_not_decoded": len(image_ids) - len(row_of),
               "modes": {mode: {**_mode_metrics(run.results, rungs), **_fidelity(run)} for mode, run in runs.items()},
               "ladder": {rung: {key: result[key] for key in ("overall", "perAnswerType", "perQuestionType",
                                                              "images_without_text", "images_shortened")}
                          for rung, result in rungs.items()}}
    samples = vqa_samples(spec, records, annotations, headline.predictions, headline.results, params)
    others = {mode: run.answers() for mode, run in runs.items() if run is not headline}
    for sample in samples:
        sample["description"] = headline.descriptions.get("image", {}).get(sample["image_id"])
        for question in sample["questions"]:
            question["modes"] = {mode: answers[question["question_id"]] for mode, answers in others.items()}
    return metrics, samples


def mode_folder(benchmark_folder: Path, mode: str, modes: list[str]) -> Path:
    """Where a VQA mode's predictions are written: the headline (first) mode's in the benchmark's folder,
    where the official formats are expected; another mode's in a subfolder named after it."""
    return benchmark_folder if mode == modes[0] else benchmark_folder / mode


@dataclass
class _ModeRun:
    """One VQA mode's outcome: scores and official predictions per condition, describe mode's descriptions."""

    results: dict
    predictions: dict
    descriptions: dict
    # direct mode: the share of generations that rewrote the prompt before answering, the student's (image) and
    # the language model's before distillation (text_only)
    prompt_kept: dict

    def answers(self) -> dict[int, dict]:
        """{question_id: {"answer", "score"}} with the image."""
        scores = self.results["image"]["perQuestion"]
        return {p["question_id"]: {"answer": p["answer"], "score": scores[p["question_id"]]}
                for p in self.predictions["image"]}


def _vqa_mode(mode: str, name: str, spec: BenchmarkSpec, questions: dict, annotations: dict, records: list[dict],
              usable: list[dict], prompts: list[str], conditions: dict, student: Student, plm: tuple,
              params: EvaluateParams) -> _ModeRun:
    """One way of asking (direct or describe) under every condition."""
    answerer = Generator(student, plm, Asking.of(params), params.vqa_max_new_tokens)  # direct, and describe's answers
    describer = Generator(student, plm, Asking.of(params), params.caption_max_new_tokens)
    results, predictions, descriptions, prompt_kept = {}, {}, {}, {}
    for condition, condition_features in conditions.items():
        what = f"{name} {mode} {condition}"
        if mode == "describe":
            answers, descriptions[condition] = described_answers(usable, prompts, condition_features, describer,
                                                                  answerer, Asking.of(params), what)
        else:
            answers = answerer.answers(prompts, condition_features, what)
            if condition in ("image", "text_only"):
                prompt_kept[condition] = answerer.prompt_kept(prompts, condition_features)
        by_id = {record["question_id"]: answer for record, answer in zip(usable, answers, strict=True)}
        # Questions whose image could not be decoded get an empty answer: counted and scored 0, not dropped.
        predictions[condition] = [{"question_id": r["question_id"], "answer": by_id.get(r["question_id"], "")}
                                  for r in records]
        results[condition] = score_vqa(questions, annotations, predictions[condition], params.normalize,
                                       sources={"questions": str(spec.questions), "annotations": str(spec.annotations),
                                                "predictions": f"{what} predictions"})
        log.info("%s: VQA accuracy %.2f", what, results[condition]["overall"])
    return _ModeRun(results, predictions, descriptions, prompt_kept)


def _mode_metrics(results: dict, rungs: dict, per_question_type: bool = False) -> dict:
    """One mode's scores with the image and under each control, and the share of the gap from the blank
    control to each rung of the ladder it closes."""
    keys = ("overall", "perAnswerType", "perQuestionType") if per_question_type else ("overall", "perAnswerType")
    return {**{key: results["image"][key] for key in keys},
            "controls": {c: {"overall": results[c]["overall"], "perAnswerType": results[c]["perAnswerType"]}
                         for c in VQA_CONTROLS},
            "gap_closed": {rung: gap_closed(results["image"], results["blank"], result, per_question_type)
                           for rung, result in rungs.items()}}


def _fidelity(run: _ModeRun) -> dict:
    return {"prompt_kept": run.prompt_kept} if run.prompt_kept else {}


def _write_vqa_files(folder: Path, run: _ModeRun) -> None:
    _write_predictions(folder, run.predictions)
    for condition, by_image in run.descriptions.items():  # describe mode: what each answer was based on
        (folder / f"descriptions_{condition}.json").write_text(
            json.dumps([{"image_id": i, "description": d} for i, d in by_image.items()]) + "\n")


def _vqa_conditions(table: torch.Tensor, row_of: dict[int, int], usable: list[dict],
                    other: dict[int, int]) -> dict[str, FeatureRows | None]:
    """Each VQA condition as rows of the per-image table, one per usable question (None: no image)."""
    if not usable:
        return dict.fromkeys(("image", "blank", "shuffled", "text_only"))
    blank_row = len(table) - 1
    return {
        "image": FeatureRows(table, long_tensor([row_of[r["image_id"]] for r in usable])),
        "blank": FeatureRows(table, torch.full((len(usable),), blank_row, dtype=torch.long)),
        # An image whose deranged partner could not be decoded gets the blank image.
        "shuffled": FeatureRows(table, long_tensor([row_of.get(other[r["image_id"]], blank_row) for r in usable])),
        "text_only": None,
    }


def _captions(name: str, spec: BenchmarkSpec, student: Student, plm: tuple, teacher, params: EvaluateParams,
              folder: Path) -> tuple[dict, list]:
    annotations = read_json(spec.annotations)
    images = annotations.get("images") if isinstance(annotations, dict) else None
    if not isinstance(images, list):
        raise VlkdError(f"{spec.annotations} has no \"images\" list; use the COCO captions format")
    image_ids = sorted(image["id"] for image in images)
    table, row_of = _per_image_table(*_benchmark_features(name, spec, image_ids, teacher, student, params))
    usable = [image_id for image_id in image_ids if image_id in row_of]
    prompt = fill_prompt(params.caption_prompt)
    blank_rows = torch.full((len(usable),), len(table) - 1, dtype=torch.long)
    conditions = {"image": FeatureRows(table, long_tensor([row_of[i] for i in usable])) if usable else None,
                  "blank": FeatureRows(table, blank_rows) if usable else None, "text_only": None}
    generator = Generator(student, plm, Asking.of(params), params.caption_max_new_tokens)
    results, predictions = {}, {}
    for condition, condition_features in conditions.items():
        captions = dict(zip(usable, generator.answers([prompt] * len(usable), condition_features,
                                                      f"{name} {condition}"), strict=True))
        predictions[condition] = [{"image_id": i, "caption": captions.get(i, "")} for i in image_ids]
        results[condition] = score_captions(annotations, predictions[condition],
                                            sources={"annotations": str(spec.annotations),
                                                     "predictions": f"{name} {condition} predictions"})
        log.info("%s %s: CIDEr %.3f", name, condition, results[condition]["CIDEr"])
    _write_predictions(folder, predictions)
    metrics = {key: value for key, value in results["image"].items() if key not in ("perImage", "tokenizer")}
    metrics["images_not_decoded"] = len(image_ids) - len(usable)
    metrics["controls"] = {c: {"CIDEr": results[c]["CIDEr"]} for c in CAPTION_CONTROLS}
    return metrics, caption_samples(spec, annotations, predictions, results, params)


@torch.inference_mode()
def _retention(params: EvaluateParams, student: Student, plm: tuple, device: torch.device,
               blank: torch.Tensor) -> dict:
    """Infilling loss on held-out text before and after distillation, with the same noise for both; and the
    student's with the blank image's prefix in front, the input it was distilled on (where a text ability lost
    without an image is kept with one, distillation moved it rather than erased it)."""
    heldout = _heldout_text(params)
    if heldout is None:
        log.warning("text retention not measured: the language model %s was built without held-out text "
                    "(set plm.heldout)", params.plm)
        return {"skipped": "the language model has no held-out text (plm.heldout)"}
    documents = read_documents(heldout, "plm.heldout")
    bart, tokenizer = plm
    before = infilling_loss(bart, tokenizer, documents, 0.3, 3.0, RETENTION_MAX_TOKENS, device=device)
    after = infilling_loss(student.bart, student.tokenizer, documents, 0.3, 3.0, RETENTION_MAX_TOKENS, device=device)
    # The prefix takes positions too, so the text may be cut shorter; a document shorter than both limits (every
    # one of the world's) is read with the same noise as above.
    behind = infilling_loss(_BehindAnImage(student, blank.to(device)), student.tokenizer, documents, 0.3, 3.0,
                            RETENTION_MAX_TOKENS - _prefix_length(student, blank), device=device)
    return {"language_model_loss": before["loss"], "student_loss": after["loss"],
            "loss_increase": round(after["loss"] - before["loss"], 6), "documents": before["documents"],
            "student_loss_blank_image": behind["loss"]}


class _BehindAnImage(torch.nn.Module):
    """The student's BART with one image's prefix in front of every input, called as `infilling_loss` calls a BART."""

    def __init__(self, student: Student, features: torch.Tensor):
        super().__init__()
        self.student, self.features = student, features

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        features = self.features.expand(len(input_ids), *self.features.shape)
        embeds, mask = self.student.encoder_inputs(input_ids, attention_mask, features)
        return self.student.bart(inputs_embeds=embeds, attention_mask=mask, labels=labels)


def _prefix_length(student: Student, features: torch.Tensor) -> int:
    return student.visual_prefix(features.unsqueeze(0).to(student.text_projection.weight.device)).shape[1]


# -- helpers -------------------------------------------------------------------------------------------------
def _benchmark_features(name: str, spec: BenchmarkSpec, image_ids: list[int], teacher, student: Student,
                        params: EvaluateParams) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The teacher's features of each image and of the blank image; for a student distilled with
    `aligned_teacher` (the ladder's diagnostic rung), its text features of each image's first caption."""
    if not student.config.aligned_teacher:
        return image_features(spec, image_ids, teacher, params.cache / name, student.config.prefix == "patch",
                              params.device)
    captions = spec.captions if spec.task == "vqa" else spec.annotations
    if captions is None:
        raise VlkdError(f"{params.student} was distilled with aligned_teacher: it reads a caption's text features "
                        f"in place of an image's, and benchmark {name} has no `captions`; add them or evaluate "
                        "another student")
    return caption_features(captions, image_ids, teacher)


def _per_image_table(features: dict[int, torch.Tensor], blank: torch.Tensor) -> tuple[torch.Tensor, dict[int, int]]:
    """Every decoded image's features once, in image id order, with the blank image's as the last row
    ([images + 1, ...]), and each image id's row. Called on `image_features`' result directly, so its
    dictionary (and the feature store's batches its values are views of) is freed as soon as the table is
    built: the features are held twice only while it is."""
    image_ids = sorted(features)
    return torch.stack([features[i] for i in image_ids] + [blank]), {i: row for row, i in enumerate(image_ids)}


def _derangement(image_ids: list[int], seed: int) -> dict[int, int]:
    """Each image id mapped to another image id of the split (a seeded cyclic shift of a permutation)."""
    if len(image_ids) < 2:
        return {image_id: image_id for image_id in image_ids}
    order = np.random.default_rng(seed).permutation(len(image_ids))
    return {image_ids[order[k]]: image_ids[order[(k + 1) % len(order)]] for k in range(len(order))}


def _write_predictions(folder: Path, predictions: dict[str, list]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for condition, records in predictions.items():
        suffix = "" if condition == "image" else f"_{condition}"
        (folder / f"predictions{suffix}.json").write_text(json.dumps(records) + "\n")


def _heldout_text(params: EvaluateParams) -> Path | None:
    """The language model's held-out text (plm.heldout, through its folder, so DVC sees it via evaluate.plm)."""
    return language_model_text(params.plm, "heldout", "evaluate (text retention)", required=False)


def stage_inputs(params: EvaluateParams) -> dict:
    """What the evaluation reads: the student, the language model and the teacher (their folders), and each
    benchmark's files and images."""
    required = {params.student / STUDENT_CONFIG: "vlkd distill", params.student / PROJECTIONS: "vlkd distill",
                params.plm: "vlkd plm"}
    for path, command in required.items():
        if not path.exists():
            raise VlkdError(f"{path} does not exist; run `{command}` first, or check evaluate.student and "
                            "evaluate.plm")
    inputs: dict = {"student": params.student, "plm": params.plm, "teacher": params.teacher}
    for name, spec in params.benchmarks.items():
        for field in BENCHMARK_FILES:
            if getattr(spec, field) is not None:
                inputs[f"{name}.{field}"] = Path(getattr(spec, field))
    return inputs
