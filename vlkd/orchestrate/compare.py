"""This run against the promoted model it would replace: every metric old -> new, the VQA answers that
changed, the distillation's curves of both runs on one chart each; as JSON and as one self-contained HTML
page (the view `dvc metrics diff` and an experiment tracker's compare page give).

Everything comes from what the two runs recorded: the promoted model's metric and plot files from its git
tag (`git show <tag>:<file>`), its predictions from DVC at the tag (`dvc get . <path> --rev <tag>`: the
cache, else the remote), this run's from the workspace. Both runs' predictions are scored again with the
official VQA metric against the annotations params.yaml names now, so a per-question score means the same
on both sides. Gated metrics carry the gate's own Check (gate.py decides; nothing here judges).

What cannot be compared (nothing promoted yet, a benchmark added since, a plot the tag lacks, predictions in
neither the cache nor the remote) becomes one line in the comparison's `notes`, never an error.
"""

from __future__ import annotations

import math
import random
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vlkd.config import BenchmarkSpec, EvaluateParams
from vlkd.data.vqa_metric import read_json, score_vqa
from vlkd.errors import VlkdError
from vlkd.orchestrate.gate import Check, GateReport, relative_name
from vlkd.orchestrate.metrics import flatten_numbers, read_metrics
from vlkd.orchestrate.promote import fetch_at, git, locked_outputs, metrics_at, recorded_param

ANSWERS_SHOWN = 20
CAPTIONS_SHOWN = 5
CURVE_POINTS = 200  # per line: enough for a 340 px chart, and the JSON stays small at any run length


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------
def metric_changes(before: Mapping[str, Mapping] | None, after: Mapping[str, Mapping], checks: Iterable[Check],
                   files: Iterable[str]) -> list[dict[str, Any]]:
    """One row per numeric metric of `files` in either run ({file: metrics} each; `before` None: nothing
    promoted): the gated metrics first, as the gate's checks have them (values, allowed worsening, verdict),
    then the others file by file, this run's keys in their order and then those only the promoted run had."""
    checks = list(checks)
    rows = [_gated_row(check) for check in checks]
    gated = {(check.file, check.metric) for check in checks}
    for name in files:
        old = flatten_numbers((before or {}).get(name, {}))
        new = flatten_numbers(after.get(name, {}))
        for metric in [*new, *(key for key in old if key not in new)]:
            if (name, metric) not in gated:
                rows.append(_row(name, metric, _number(old.get(metric)), _number(new.get(metric))))
    return rows


def _gated_row(check: Check) -> dict[str, Any]:
    allowed = None if check.before is None else check.allowed  # the gate's 0 means "nothing to compare with"
    return {**_row(check.file, check.metric, check.before, check.after), "gated": True,
            "allowed worsening": allowed, "verdict": check.verdict}


def _row(file: str, metric: str, old: float | None, new: float | None) -> dict[str, Any]:
    change = None if old is None or new is None else new - old
    return {"file": file, "metric": metric, "promoted": old, "new": new, "change": change, "gated": False,
            "allowed worsening": None, "verdict": None}


def _number(value: float | None) -> float | None:
    """NaN as None: no value to compare, and JSON has no NaN."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


# ---------------------------------------------------------------------------------------------------
# Answers and captions
# ---------------------------------------------------------------------------------------------------
def changed_answers(questions: dict, annotations: dict, promoted: list, new: list, normalize: str = "official",
                    seed: int = 0, shown: int = ANSWERS_SHOWN, sources: Mapping[str, str] | None = None) -> dict:
    """The VQA questions whose answer changed between two prediction lists ([{question_id, answer}], the
    official format), each scored with the official metric: how many changed, improved and worsened, and a
    seeded sample of up to `shown` of them, the largest score changes first. Scores are per question, in %.
    `sources` names the inputs in error messages (keys "questions", "annotations", "promoted", "new")."""
    names = dict(sources or {})
    scored = {side: score_vqa(questions, annotations, predictions, normalize,
                              {**names, "predictions": names.get(side, f"the {side} predictions")})
              for side, predictions in (("promoted", promoted), ("new", new))}
    before, after = scored["promoted"]["perQuestion"], scored["new"]["perQuestion"]
    old_answers, new_answers = _answers(promoted), _answers(new)
    changed = [qid for qid in after if old_answers[qid] != new_answers[qid]]
    asked = {record["question_id"]: record for record in questions["questions"]}
    sample = [{"question_id": qid, "image_id": asked[qid].get("image_id"), "question": asked[qid].get("question"),
               "promoted": old_answers[qid], "promoted_score": before[qid],
               "new": new_answers[qid], "new_score": after[qid], "score_change": round(after[qid] - before[qid], 2)}
              for qid in seeded_sample(changed, shown, seed)]
    sample.sort(key=lambda item: (-abs(item["score_change"]), _id_order(item["question_id"])))
    return {"task": "vqa", "questions": len(after), "changed": len(changed),
            "improved": sum(after[qid] > before[qid] for qid in changed),
            "worsened": sum(after[qid] < before[qid] for qid in changed),
            "overall": {"promoted": scored["promoted"]["overall"], "new": scored["new"]["overall"]},
            "sample": sample}


def changed_captions(promoted: object, new: object, annotations: object = None, seed: int = 0,
                     shown: int = CAPTIONS_SHOWN, sources: Mapping[str, str] | None = None) -> dict:
    """The images whose caption changed between two caption lists ([{image_id, caption}], COCO's result
    format): how many, and a seeded sample of up to `shown` with a reference caption (from COCO-format
    `annotations`, when given)."""
    names = dict(sources or {})
    old = _captions(promoted, names.get("promoted", "the promoted captions"))
    now = _captions(new, names.get("new", "the new captions"))
    changed = [image_id for image_id in now if image_id in old and old[image_id] != now[image_id]]
    references = _references(annotations)
    sample = [{"image_id": image_id, "promoted": old[image_id], "new": now[image_id],
               "reference": references.get(image_id)} for image_id in seeded_sample(changed, shown, seed)]
    return {"task": "caption", "images": len(now), "changed": len(changed), "sample": sample}


def seeded_sample(ids: list, size: int, seed: int) -> list:
    """Up to `size` of `ids`, the same ones for the same ids and seed whatever their order."""
    ordered = sorted(ids, key=_id_order)
    return random.Random(seed).sample(ordered, min(size, len(ordered)))


def _id_order(some_id: Any) -> tuple[str, Any]:
    return type(some_id).__name__, some_id  # ids are numbers or strings (vqa_metric accepts both)


def _answers(predictions: list) -> dict:
    return {entry["question_id"]: entry["answer"] for entry in predictions}  # checked by score_vqa


def _captions(predictions: object, where: str) -> dict:
    if not isinstance(predictions, list) or not all(isinstance(p, dict) and "image_id" in p and "caption" in p
                                                    for p in predictions):
        raise VlkdError(f"{where} is not a caption list; expected [{{\"image_id\": ..., \"caption\": ...}}, ...] "
                        "as the evaluate stage writes it")
    return {entry["image_id"]: entry["caption"] for entry in predictions}


def _references(annotations: object) -> dict:
    """{image_id: its first reference caption} of COCO-format caption annotations ({} when unreadable)."""
    entries = annotations.get("annotations") if isinstance(annotations, dict) else None
    references: dict = {}
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and "image_id" in entry:
            references.setdefault(entry["image_id"], entry.get("caption"))
    return references


# ---------------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------------
def parse_curve(text: str, where: str) -> list[list[float]]:
    """A dvclive plot file (TSV: a `step` column and the metric's, maybe `timestamp`) as [[step, value]]
    sorted by step; rows that are not numbers (NaN too) are left out."""
    lines = [line.split("\t") for line in text.splitlines() if line.strip()]
    header = lines[0] if lines else []
    values = [i for i, name in enumerate(header) if name not in ("step", "timestamp")]
    if "step" not in header or not values:
        raise VlkdError(f"{where} is not a dvclive plot (a TSV with a step column and a value column)")
    step, value = header.index("step"), values[-1]
    points = []
    for cells in lines[1:]:
        try:
            point = [float(cells[step]), float(cells[value])]
        except (IndexError, ValueError):
            continue
        if all(math.isfinite(number) for number in point):
            points.append(point)
    return sorted(points)


def downsample(points: list, limit: int = CURVE_POINTS) -> list:
    """At most about `limit` points, evenly spaced, the last one kept (where a curve ends matters most)."""
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    kept = points[::stride]
    return kept if kept[-1] is points[-1] else [*kept, points[-1]]


def curve_pairs(promoted: Mapping[str, str] | None, new: Mapping[str, str], baseline: str | None
                ) -> tuple[list[dict], list[str]]:
    """Both runs' curves by name ({name: TSV text} each; `promoted` None: nothing promoted) as
    [{name, promoted, new}] (points, or None where a run has no such curve), and a note per gap."""
    curves, notes = [], []
    for name in sorted({*new, *(promoted or {})}):
        sides = {}
        for side, texts in (("promoted", promoted), ("new", new)):
            try:
                sides[side] = _points(texts, name, f"{baseline if side == 'promoted' else 'this run'}'s {name}")
            except VlkdError as err:
                sides[side] = None
                notes.append(f"curve {name}: {one_line(err)}")
        if promoted is not None and name not in promoted:
            notes.append(f"curve {name}: {baseline} has no such plot; this run's is drawn alone")
        if name not in new:
            notes.append(f"curve {name}: this run has no such plot; {baseline}'s is drawn alone")
        curves.append({"name": name, **sides})
    return curves, notes


def _points(texts: Mapping[str, str] | None, name: str, where: str) -> list | None:
    return downsample(parse_curve(texts[name], where)) if texts and name in texts else None


def curves_in_workspace(root: Path, folder: str) -> dict[str, str]:
    """{name: TSV text} of the dvclive plot files under `folder` (name: the path below it, without .tsv)."""
    base = root / folder
    return {path.relative_to(base).with_suffix("").as_posix(): path.read_text()
            for path in sorted(base.rglob("*.tsv"))} if base.is_dir() else {}


def curves_at(root: Path, ref: str, folder: str) -> dict[str, str]:
    """The same as committed at `ref` (plots are git-tracked outputs, so git holds them)."""
    listed = git(root, "ls-tree", "-r", "--name-only", ref, "--", folder, check=False).stdout.splitlines()
    prefix = folder.rstrip("/") + "/"
    return {name.removeprefix(prefix).removesuffix(".tsv"): git(root, "show", f"{ref}:{name}").stdout
            for name in listed if name.endswith(".tsv") and name.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------
# The two runs, from the repository
# ---------------------------------------------------------------------------------------------------
def compare_with_promoted(root: Path, baseline: str | None, report: GateReport, metric_files: Iterable[str],
                          evaluate: EvaluateParams, plot_folders: Iterable[str]) -> dict[str, Any]:
    """This run (the workspace) against the model promoted as `baseline` (None: nothing promoted yet):
    {baseline, gate, metrics, answers, curves, notes}, JSON-ready. `metric_files` and `plot_folders` as
    dvc.yaml declares them (relative to `root`); `report` is the gate's verdict on this run."""
    files = list(dict.fromkeys([*(check.file for check in report.checks), *metric_files]))
    before = metrics_at(root, baseline, files) if baseline else None
    after = read_metrics(root, files)
    notes = [] if baseline else ["nothing promoted yet: this run is shown alone"]
    notes += _missing_metric_files(files, before, after, baseline)
    answers, answer_notes = compare_benchmarks(root, baseline, evaluate)
    curves, curve_notes = [], []
    for folder in plot_folders:
        pairs, gaps = curve_pairs(curves_at(root, baseline, folder) if baseline else None,
                                  curves_in_workspace(root, folder), baseline)
        curves += pairs
        curve_notes += gaps
    return {"baseline": baseline, "gate": report.summary(), "metrics": metric_changes(before, after,
                                                                                        report.checks, files),
            "answers": answers, "curves": curves, "notes": notes + answer_notes + curve_notes}


def _missing_metric_files(files: list[str], before: Mapping | None, after: Mapping, baseline: str | None) -> list[str]:
    notes = []
    neither = [name for name in files if name not in after and name not in (before or {})]
    if neither:
        notes.append(f"no metrics from either run in {', '.join(neither)} (those stages have not run)")
    if before is not None:
        only_new = [name for name in files if name in after and name not in before]
        only_old = [name for name in files if name in before and name not in after]
        if only_new:
            notes.append(f"{baseline} has no {', '.join(only_new)}: this run's values are shown alone")
        if only_old:
            notes.append(f"this run has no {', '.join(only_old)}: {baseline}'s values are shown alone")
    return notes


def compare_benchmarks(root: Path, baseline: str | None, evaluate: EvaluateParams) -> tuple[dict, list[str]]:
    """{benchmark: changed answers or captions} of every benchmark params.yaml names, between the
    evaluate stage's predictions at `baseline` and in the workspace, and a note per benchmark left out."""
    if baseline is None:
        return {}, []  # the comparison's first note says so
    output = relative_name(evaluate.output, root)
    if not (root / output).is_dir():
        return {}, [f"this run has no evaluation ({output} does not exist): no answers to compare"]
    promoted_output = recorded_param(root, baseline, "evaluate", "output")
    promoted_output = promoted_output if isinstance(promoted_output, str) else output
    if promoted_output not in locked_outputs(root, baseline):
        return {}, [f"{baseline} recorded no evaluation ({promoted_output} is not in its dvc.lock): "
                    "no answers to compare"]
    promoted_benchmarks = recorded_param(root, baseline, "evaluate", "benchmarks")
    found, notes = {}, []
    for name, spec in evaluate.benchmarks.items():
        if isinstance(promoted_benchmarks, dict) and name not in promoted_benchmarks:
            notes.append(f"{name}: a benchmark added since {baseline}, nothing to compare with")
            continue
        try:
            found[name] = compare_benchmark(root, baseline, spec, f"{output}/{name}/predictions.json",
                                            f"{promoted_output}/{name}/predictions.json", evaluate)
        except VlkdError as err:
            notes.append(f"{name}: {one_line(err)}")
    return found, notes


def compare_benchmark(root: Path, baseline: str, spec: BenchmarkSpec, path: str, promoted_path: str,
                      evaluate: EvaluateParams) -> dict:
    """One benchmark's changed answers (VQA) or captions; a VlkdError says in one line why it cannot be."""
    if not (root / path).is_file():
        raise VlkdError(f"this run has no {path}; run the evaluate stage to compare its answers")
    new = read_json(root / path)
    promoted = promoted_json(root, baseline, promoted_path)
    sources = {"promoted": f"{baseline}'s {promoted_path}", "new": f"this run's {path}",
               "annotations": str(spec.annotations)}
    if spec.task == "caption":
        return changed_captions(promoted, new, read_json(root / spec.annotations), evaluate.seed, sources=sources)
    return changed_answers(read_json(root / spec.questions), read_json(root / spec.annotations), promoted, new,
                           evaluate.normalize, evaluate.seed, sources={**sources, "questions": str(spec.questions)})


def one_line(err: BaseException) -> str:
    """An error as one line, whole (first_line would cut the advice at the end of a long one)."""
    return " ".join(str(err).split()) or type(err).__name__


def promoted_json(root: Path, ref: str, path: str) -> object:
    """A JSON file inside a DVC output as the commit `ref` recorded it (the cache, else the remote)."""
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / Path(path).name
        reason = fetch_at(root, ref, path, target)
        if reason is not None:
            raise VlkdError(f"cannot fetch {path} as {ref} recorded it ({reason}); `dvc fetch --all-tags` "
                            "(or `dvc push` from the machine that has it) to compare its answers")
        return read_json(target)
