"""The finetune stage: the low-shot protocol of CLIP-TD over every task in finetune.tasks.

    for each task: read its splits (tasks.py) -> fixed training subsets, one per fraction, saved to disk
                   -> the teacher's targets for the training split (targets.py, cached)
                   -> a run (train.py) for each fraction x variant x seed, and the ablations at their
                      fractions -> scores on the in-domain and shifted test splits
    then: the table of scores and gains over `none` (mean and spread over seeds), a CSV per task and
          split for `dvc plots`, an HTML page with the plots, and the models of `save_fraction`.

Runs already finished are kept in the checkpoint folder, so a killed protocol resumes at the run it was in
(and that run at its last checkpoint). An output folder whose record (`vlkd.record`) matches this run's is
kept as it is.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
from pathlib import Path

from PIL import Image

from vlkd.config import FinetuneParams
from vlkd.errors import VlkdError
from vlkd.finetune.report import write_report
from vlkd.finetune.targets import load_or_compute
from vlkd.finetune.tasks import labels_of, read_split
from vlkd.finetune.train import TaskData, run
from vlkd.io import building_folder, params_record, sha256_file, write_json_atomic
from vlkd.models.teacher import load_teacher, resolve_teacher
from vlkd.models.vilt import load_processor, pixel_values, tokenize
from vlkd.record import StageRecord, fingerprint
from vlkd.training import resolve_device

log = logging.getLogger(__name__)

MANIFEST = "vlkd-finetune.json"
SUBSET_SEED = 0


def finetune(params: FinetuneParams, replace_other_teachers: bool = False) -> dict:
    """Run the protocol; returns the metrics (also in `params.output`/results.json)."""
    if not params.tasks:
        raise VlkdError("finetune.tasks is empty; name at least one task (vqa or ve files) in params.yaml")
    record = stage_record(params)
    if record.reusable(Path(params.output)):
        log.info("fine-tuned models in %s are up to date with their record; the protocol is not run again",
                 params.output)
        return json.loads((Path(params.output) / "results.json").read_text())
    device = resolve_device(params.device, "finetune.device")
    model_name, pretrained = resolve_teacher(Path(params.teacher))
    teacher = load_teacher(model_name, pretrained, device=device, image_tokens=True)
    processor = load_processor(params.vlm)
    progress_dir = Path(params.checkpoints) / _protocol_key(params, record)
    metrics, saved, subsets = {}, {}, {}
    for name, spec in params.tasks.items():
        task = _load_task(name, spec, params, teacher, processor, device, replace_other_teachers, record)
        subsets[name] = fixed_subsets([e.id for e in task.train.examples], _all_fractions(params))
        results, saved[name] = _protocol(params, task, subsets[name], device, progress_dir / name)
        metrics[name] = summarise(params, task, subsets[name], results)
    with building_folder(Path(params.output), MANIFEST, "fine-tuned models", "finetune.output") as building:
        (building / "subsets").mkdir()
        for name, models in saved.items():
            write_json_atomic(building / "subsets" / f"{name}.json", {str(f): ids for f, ids in subsets[name].items()})
            for variant, model in models.items():
                model.save_pretrained(building / name / variant)
                processor.save_pretrained(building / name / variant)
        write_json_atomic(building / "results.json", metrics)
        write_report(building / "report.html", metrics)
        write_json_atomic(building / MANIFEST, {"teacher": teacher.fingerprint.as_dict(),
                                                "params": params_record(params, building / MANIFEST)})
        record.write(building)
    return metrics


def fixed_subsets(ids: list[str], fractions: list[float]) -> dict[float, list[str]]:
    """Nested subsets of the training ids, one per fraction: the first round(f * N) (at least one) of one
    seeded permutation, so every variant and seed trains on the same examples and 1% lies inside 5%."""
    order = sorted(ids)
    random.Random(f"vlkd-finetune-subsets/{SUBSET_SEED}").shuffle(order)
    return {fraction: sorted(order[:max(1, round(fraction * len(order)))]) for fraction in sorted(set(fractions))}


def _all_fractions(params: FinetuneParams) -> list[float]:
    return sorted(set(params.fractions) | set(params.ablation_fractions if params.ablations else []))


def runs_of(params: FinetuneParams) -> list[tuple[float, str, int]]:
    """(fraction, variant, seed) of every run: the variants at every fraction, the ablations at theirs."""
    main = [(f, v, s) for f in params.fractions for v in params.variants for s in params.seeds]
    ablations = [(f, v, s) for f in params.ablation_fractions for v in params.ablations for s in params.seeds]
    return main + [run for run in ablations if run not in main]


def _load_task(name, spec, params: FinetuneParams, teacher, processor, device, replace_other_teachers,
               record: StageRecord) -> TaskData:
    train = read_split(spec.task, spec.train, f"finetune.tasks.{name}.train")
    tests = {split: read_split(spec.task, getattr(spec, split), f"finetune.tasks.{name}.{split}")
             for split in ("test", "shifted") if getattr(spec, split) is not None}
    if not train.examples:
        raise VlkdError(f"finetune.tasks.{name}.train has no usable examples; check its files and images")
    labels = labels_of(spec, train, params.answer_vocabulary)
    max_length = processor.tokenizer.model_max_length
    words = tokenize(processor.tokenizer, [e.text for e in train.examples], max_length).words
    inputs = {"files": _file_hashes(spec.train), "labels": labels, "candidate": params.vqa_candidate,
              "temperature": params.temperature, "words": fingerprint(words),
              "code": record.code, "libraries": record.libraries}  # targets of other code are recomputed
    targets = load_or_compute(Path(params.cache) / f"targets-{name}.parquet", teacher, train.examples, words,
                              spec.task, labels, inputs, replace_other_teachers, device, params.eval_batch_size)
    images = sorted({e.image for split in (train, *tests.values()) for e in split.examples})
    pixels = {}
    for start in range(0, len(images), 256):
        chunk = images[start:start + 256]
        for path, values in zip(chunk, pixel_values(processor, [Image.open(p) for p in chunk]), strict=True):
            pixels[path] = values
    log.info("task %s: %d training examples, %s test examples, %d labels", name, len(train.examples),
             {split: len(s.examples) for split, s in tests.items()}, len(labels))
    return TaskData(name, spec.task, labels, train, tests, pixels, targets, processor.tokenizer, max_length)


def _protocol(params: FinetuneParams, task: TaskData, subsets, device, progress_dir: Path):
    done_file = progress_dir / "results.jsonl"
    done = {}
    if done_file.is_file():
        for line in done_file.read_text().splitlines():
            record = json.loads(line)
            done[(record["fraction"], record["variant"], record["seed"])] = record
    saved = {}
    for fraction, variant, seed in runs_of(params):
        key = (fraction, variant, seed)
        keep = fraction == params.save_fraction and seed == params.seeds[0]
        if key in done and not (keep and not (progress_dir / "models" / variant).is_dir()):
            if keep:
                saved[variant] = _load_saved(progress_dir / "models" / variant)
            continue
        model, result = run(params, task, Path(params.vlm), subsets[fraction], seed, variant, device,
                            progress_dir / f"run-{fraction}-{variant}-{seed}.pt")
        record = {"fraction": fraction, "variant": variant, "seed": seed, **result}
        log.info("%s %s at %g, seed %d: %s", task.name, variant, fraction, seed,
                 {split: s["score"] for split, s in result["scores"].items()})
        if keep:
            model.save_pretrained(progress_dir / "models" / variant)
            saved[variant] = model
        progress_dir.mkdir(parents=True, exist_ok=True)
        with done_file.open("a") as out:
            out.write(json.dumps(record, sort_keys=True) + "\n")
        done[key] = record
    return list(done.values()), saved


def _load_saved(folder: Path):
    from transformers import ViltForQuestionAnswering

    return ViltForQuestionAnswering.from_pretrained(str(folder))


def summarise(params: FinetuneParams, task: TaskData, subsets: dict[float, list[str]], results: list[dict]) -> dict:
    """{split: {variant: {fraction: {mean, std, seeds, gain_mean, gain_std}}}} and the task's sizes."""
    score = {(r["fraction"], r["variant"], r["seed"]): r["scores"] for r in results}
    table: dict = {"sizes": {"train": len(task.train.examples),
                             **{split: len(s.examples) for split, s in task.tests.items()}},
                   "labels": len(task.labels)}
    for split in task.tests:
        by_variant: dict = {}
        for fraction, variant, _ in runs_of(params):
            if str(fraction) in by_variant.get(variant, {}):
                continue
            seeds = [score[(fraction, variant, s)][split]["score"] for s in params.seeds
                     if (fraction, variant, s) in score]
            gains = [score[(fraction, variant, s)][split]["score"] - score[(fraction, "none", s)][split]["score"]
                     for s in params.seeds if (fraction, variant, s) in score and (fraction, "none", s) in score]
            by_variant.setdefault(variant, {})[str(fraction)] = {
                "mean": round(statistics.fmean(seeds), 2), "std": round(_std(seeds), 2), "seeds": seeds,
                **({"gain_mean": round(statistics.fmean(gains), 2), "gain_std": round(_std(gains), 2)}
                   if gains and variant != "none" else {})}
        table[split] = by_variant
    table["examples"] = {str(f): len(ids) for f, ids in subsets.items()}
    return table


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _file_hashes(split) -> dict[str, str]:
    return {field: sha256_file(Path(getattr(split, field))) for field in ("questions", "annotations", "file")
            if getattr(split, field) is not None}


def stage_record(params: FinetuneParams) -> StageRecord:
    return StageRecord.of("finetune", __name__, params, stage_inputs(params), Path(params.output) / MANIFEST)


def stage_inputs(params: FinetuneParams) -> dict:
    """What the protocol reads: the vision-language model, the teacher (their folders) and every task split's
    files and images."""
    inputs: dict = {"vlm": Path(params.vlm), "teacher": Path(params.teacher)}
    for name, spec in params.tasks.items():
        for split in ("train", "test", "shifted"):
            files = getattr(spec, split)
            for field in ("images", "questions", "annotations", "file"):
                if files is not None and getattr(files, field) is not None:
                    inputs[f"{name}.{split}.{field}"] = Path(getattr(files, field))
    return inputs


def _protocol_key(params: FinetuneParams, record: StageRecord) -> str:
    """What finished runs must share with this protocol to count as its runs: the record (inputs, code,
    libraries) and the params, less those that say where, how fast, or which runs the protocol takes."""
    shaping = params.model_dump(mode="json", exclude={"output", "checkpoints", "device", "eval_batch_size",
                                                      "fractions", "seeds", "variants", "ablations",
                                                      "ablation_fractions", "save_fraction", "checkpoint_every"})
    return fingerprint([shaping, record.inputs, record.code, record.libraries])[:16]
