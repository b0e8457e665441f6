"""The comparison of a run with the promoted model it would replace (vlkd/orchestrate/compare.py): metric
rows with the gate's verdicts, the VQA answers that changed scored by the official metric, changed
captions, the curves side by side; and once through a real git + DVC repository with a promoted tag,
where the promoted predictions come from DVC at the tag and each missing piece is one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from test_dvc_pipeline import dvc, git

from vlkd.config import BenchmarkSpec, EvaluateParams, GateMetric
from vlkd.data.vqa_metric import question_accuracy
from vlkd.errors import VlkdError
from vlkd.orchestrate.compare import (
    changed_answers,
    changed_captions,
    compare_with_promoted,
    curve_pairs,
    metric_changes,
    parse_curve,
    promoted_json,
)
from vlkd.orchestrate.comparison_report import markdown_summary, render_html, write_comparison
from vlkd.orchestrate.gate import compare

EVALUATE = "metrics/evaluate.json"


# ---------------------------------------------------------------------------------------------------
# Hand-made inputs
# ---------------------------------------------------------------------------------------------------
def humans(*answers: str) -> list[dict]:
    """Ten human answer records (distinct ids, as in VQAv2: the official metric compares whole records)."""
    return [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i, answer in enumerate(answers)]


# question id -> (question, human answers)
QUESTIONS = {
    1: ("what colour is the circle?", humans(*["red"] * 10)),
    2: ("how many squares are there?", humans("two", "two", *["three"] * 8)),
    3: ("is there a star?", humans(*["yes"] * 10)),
    4: ("what shape is left?", humans(*["circle"] * 10)),
    5: ("what colour is the star?", humans(*["blue"] * 10)),
}
PROMOTED = {1: "red", 2: "two", 3: "yes", 4: "square", 5: "green"}
NEW = {1: "blue", 2: "three", 3: "yes", 4: "triangle", 5: "blue"}


def vqa_files(questions: dict = QUESTIONS) -> tuple[dict, dict]:
    """A VQAv2-format questions file and its annotations."""
    return ({"questions": [{"question_id": qid, "image_id": 100 + qid, "question": text}
                           for qid, (text, _) in questions.items()]},
            {"annotations": [{"question_id": qid, "image_id": 100 + qid, "question_type": "what",
                              "answer_type": "other", "answers": answers}
                             for qid, (_, answers) in questions.items()]})


def predictions(answers: dict) -> list[dict]:
    return [{"question_id": qid, "answer": answer} for qid, answer in answers.items()]


def test_metric_changes_list_every_metric_gated_first_with_the_gates_verdict():
    before = {EVALUATE: {"vqa": {"overall": 50.0, "perAnswerType": {"yes/no": 70.0}}, "captions": {"CIDEr": 0.5},
                         "gone": 1.0},
              "metrics/download.json": {"url_list": {"successes": 40}}}
    after = {EVALUATE: {"vqa": {"overall": 40.0, "perAnswerType": {"yes/no": 70.0}}, "captions": {"CIDEr": 0.6},
                        "added": float("nan")},
             "metrics/download.json": {"url_list": {"successes": 60}}}
    gate = [GateMetric(metric="captions.CIDEr"), GateMetric(metric="vqa.overall", relative_tolerance=0.05)]
    report = compare(before, after, gate, None, "promoted/v1")

    rows = metric_changes(before, after, report.checks, [EVALUATE, "metrics/download.json"])

    by_name = {row["metric"]: row for row in rows}
    assert [row["metric"] for row in rows[:2]] == ["captions.CIDEr", "vqa.overall"]  # gated, in the gate's order
    assert by_name["vqa.overall"] == {"file": EVALUATE, "metric": "vqa.overall", "promoted": 50.0, "new": 40.0,
                                      "change": -10.0, "gated": True, "allowed worsening": 2.5, "verdict": "worse"}
    assert by_name["captions.CIDEr"]["verdict"] == "better"
    assert by_name["vqa.perAnswerType.yes/no"] == {
        "file": EVALUATE, "metric": "vqa.perAnswerType.yes/no", "promoted": 70.0, "new": 70.0, "change": 0.0,
        "gated": False, "allowed worsening": None, "verdict": None}
    assert by_name["url_list.successes"]["change"] == 20
    assert (by_name["added"]["promoted"], by_name["added"]["new"], by_name["added"]["change"]) == (None, None, None)
    assert (by_name["gone"]["promoted"], by_name["gone"]["new"]) == (1.0, None)
    assert len(rows) == len(by_name) == 6  # each metric once, the gated ones not repeated
    assert "| vqa.overall | metrics/evaluate.json | 50 | 40 | -10 | 2.5 | worse |" in markdown_summary(
        {"baseline": "promoted/v1", "metrics": rows, "answers": {}, "notes": []}, Path("comparison.html"))


def test_changed_answers_are_scored_with_the_official_metric_and_the_largest_changes_come_first():
    questions, annotations = vqa_files()

    result = changed_answers(questions, annotations, predictions(PROMOTED), predictions(NEW))

    # 1: right -> wrong; 2: 60% ("two": 2 of 10 humans) -> 100%; 4: wrong -> wrong; 5: wrong -> right; 3 the same
    assert question_accuracy(QUESTIONS[2][1], "two") == pytest.approx(0.6)
    assert (result["questions"], result["changed"], result["improved"], result["worsened"]) == (5, 4, 2, 1)
    sample = [(item["question_id"], item["promoted"], item["promoted_score"], item["new"], item["new_score"],
               item["score_change"]) for item in result["sample"]]
    assert sample == [(1, "red", 100.0, "blue", 0.0, -100.0), (5, "green", 0.0, "blue", 100.0, 100.0),
                      (2, "two", 60.0, "three", 100.0, 40.0), (4, "square", 0.0, "triangle", 0.0, 0.0)]
    assert result["sample"][0]["question"] == "what colour is the circle?" and result["sample"][0]["image_id"] == 101
    assert result["overall"] == {"promoted": 52.0, "new": 60.0}


def test_the_sample_of_changed_answers_is_seeded_and_bounded():
    many = {qid: (f"question {qid}?", humans(*["yes"] * 10)) for qid in range(60)}
    questions, annotations = vqa_files(many)
    old = predictions({qid: "yes" for qid in many})
    new = predictions({qid: "no" if qid % 2 else "maybe" for qid in many})

    first = changed_answers(questions, annotations, old, new, seed=3)
    shuffled = {"annotations": list(reversed(annotations["annotations"]))}
    again = changed_answers(questions, shuffled, list(reversed(old)), list(reversed(new)), seed=3)
    other = changed_answers(questions, annotations, old, new, seed=4)

    assert (first["changed"], first["worsened"], len(first["sample"])) == (60, 60, 20)
    assert first["sample"] == again["sample"]  # the same questions whatever the files' order
    assert {item["question_id"] for item in other["sample"]} != {item["question_id"] for item in first["sample"]}


def test_predictions_for_other_questions_are_refused_in_one_line_naming_the_file():
    questions, annotations = vqa_files()
    with pytest.raises(VlkdError, match=r"promoted/v1's data/eval/vqa/predictions.json") as err:
        changed_answers(questions, annotations, predictions({**PROMOTED, 99: "red"}), predictions(NEW),
                        sources={"promoted": "promoted/v1's data/eval/vqa/predictions.json"})
    assert "\n" not in str(err.value)


def test_changed_captions_are_counted_with_a_sample_and_a_reference():
    old = [{"image_id": i, "caption": f"there is a red circle {i}"} for i in range(8)]
    new = [dict(entry, caption="there is a blue square") if entry["image_id"] in (2, 5, 7) else entry
           for entry in old]
    references = {"annotations": [{"image_id": i, "id": i, "caption": f"a reference {i}"} for i in range(8)]}

    result = changed_captions(old, new, references, shown=2)

    assert (result["images"], result["changed"], len(result["sample"])) == (8, 3, 2)
    for item in result["sample"]:
        assert item["image_id"] in (2, 5, 7) and item["new"] == "there is a blue square"
        assert item["promoted"] == f"there is a red circle {item['image_id']}"
        assert item["reference"] == f"a reference {item['image_id']}"
    with pytest.raises(VlkdError, match="is not a caption list"):
        changed_captions({"oops": 1}, new)


def test_curves_of_both_runs_are_paired_by_name_and_a_missing_one_is_a_note():
    promoted = {"train/loss": "step\tloss\n0\t3.0\n1\t2.0\n", "train/gone": "step\tgone\n0\t1\n"}
    new = {"train/loss": "step\tloss\n0\t2.5\n1\tnan\n2\t1.0\n", "train/ttdm": "timestamp\tstep\tttdm\n9\t0\t0.5\n"}

    curves, notes = curve_pairs(promoted, new, "promoted/v1")

    by_name = {curve["name"]: curve for curve in curves}
    assert by_name["train/loss"] == {"name": "train/loss", "promoted": [[0, 3.0], [1, 2.0]],
                                     "new": [[0, 2.5], [2, 1.0]]}
    assert by_name["train/ttdm"]["promoted"] is None and by_name["train/ttdm"]["new"] == [[0, 0.5]]
    assert by_name["train/gone"]["new"] is None
    assert notes == ["curve train/gone: this run has no such plot; promoted/v1's is drawn alone",
                     "curve train/ttdm: promoted/v1 has no such plot; this run's is drawn alone"]
    page = render_html({"baseline": "promoted/v1", "gate": "ok", "metrics": [], "answers": {}, "curves": curves,
                        "notes": notes})
    assert page.count("<svg") == 3 and page.count("<polyline") == 4
    with pytest.raises(VlkdError, match="not a dvclive plot"):
        parse_curve("loss\n1.0\n", "x.tsv")


# ---------------------------------------------------------------------------------------------------
# Through a git repository with a promoted tag, the promoted predictions from DVC
# ---------------------------------------------------------------------------------------------------
MAKE = """\
import json, os, yaml
made = yaml.safe_load(open("params.yaml"))["make"]
for name in ("data/eval/vqa", "data/eval/captions", "metrics/distill/plots/metrics/train"):
    os.makedirs(name, exist_ok=True)
json.dump([{"question_id": int(q), "answer": a} for q, a in made["answers"].items()],
          open("data/eval/vqa/predictions.json", "w"))
json.dump([{"image_id": i, "caption": c} for i, c in enumerate(made["captions"])],
          open("data/eval/captions/predictions.json", "w"))
json.dump({"vqa": {"overall": made["overall"]}, "captions": {"CIDEr": 0.5}}, open("metrics/evaluate.json", "w"))
with open("metrics/distill/plots/metrics/train/loss.tsv", "w") as tsv:
    tsv.write("step\\tloss\\n" + "".join(f"{s}\\t{v}\\n" for s, v in enumerate(made["losses"])))
"""
DVC_YAML = {"stages": {"evaluate": {
    "cmd": f"{sys.executable} make.py", "deps": ["make.py", "bench"], "params": ["make"], "outs": ["data/eval"],
    "metrics": [{"metrics/evaluate.json": {"cache": False}}],
    "plots": [{"metrics/distill/plots/metrics": {"cache": False}}]}}}
BENCHMARKS = {"vqa": {"task": "vqa", "images": "bench/images", "questions": "bench/vqa/questions.json",
                      "annotations": "bench/vqa/annotations.json"},
              "captions": {"task": "caption", "images": "bench/images", "annotations": "bench/captions.json"}}
GATE = [GateMetric(metric="vqa.overall")]


def write_params(root: Path, answers: dict, overall: float, losses: list[float], captions: list[str]) -> None:
    """The project's params.yaml: the evaluate section compare.py reads at the tag, and what make.py writes."""
    (root / "params.yaml").write_text(yaml.safe_dump({
        "evaluate": {"output": "data/eval", "data": "bench", "benchmarks": BENCHMARKS},
        "make": {"answers": {str(qid): answer for qid, answer in answers.items()}, "overall": overall,
                 "losses": losses, "captions": captions}}))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC project whose "evaluate" stage wrote PROMOTED's answers, tagged promoted/v1, then ran
    again with NEW's (and another caption, and other losses) into the workspace."""
    root = tmp_path_factory.mktemp("compare") / "project"
    (root / "bench" / "vqa").mkdir(parents=True)
    questions, annotations = vqa_files()
    (root / "bench" / "vqa" / "questions.json").write_text(json.dumps(questions))
    (root / "bench" / "vqa" / "annotations.json").write_text(json.dumps(annotations))
    (root / "bench" / "captions.json").write_text(json.dumps(
        {"annotations": [{"image_id": 0, "id": 1, "caption": "a red circle"}]}))
    (root / "make.py").write_text(MAKE)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    write_params(root, PROMOTED, 52.0, [3.0, 2.0, 1.5], ["there is a red circle", "there is a star"])
    git(root, "init", "--quiet")
    dvc(root, "init", "--quiet")
    dvc(root, "repro")
    git(root, "add", "-A")
    git(root, "commit", "--quiet", "-m", "the promoted model")
    git(root, "tag", "promoted/v1")
    write_params(root, NEW, 60.0, [2.5, 1.0], ["there is a red circle", "there is a big star"])
    dvc(root, "repro")
    return root


def evaluate_params(benchmarks: dict = BENCHMARKS) -> EvaluateParams:
    return EvaluateParams(output=Path("data/eval"), data=Path("bench"),
                          benchmarks={name: BenchmarkSpec(**spec) for name, spec in benchmarks.items()})


def compare_repo(root: Path, baseline: str | None, benchmarks: dict = BENCHMARKS) -> dict:
    files = [EVALUATE]
    before = {EVALUATE: json.loads(git(root, "show", f"{baseline}:{EVALUATE}"))} if baseline else None
    report = compare(before, {EVALUATE: json.loads((root / EVALUATE).read_text())}, GATE, root, baseline)
    return compare_with_promoted(root, baseline, report, files, evaluate_params(benchmarks),
                                 ["metrics/distill/plots/metrics"])


def test_a_run_is_compared_with_the_promoted_tag_from_git_and_dvc(repo, tmp_path):
    comparison = compare_repo(repo, "promoted/v1")

    assert comparison["notes"] == []
    assert comparison["metrics"][0] == {"file": EVALUATE, "metric": "vqa.overall", "promoted": 52.0, "new": 60.0,
                                        "change": 8.0, "gated": True, "allowed worsening": 0.0, "verdict": "better"}
    vqa = comparison["answers"]["vqa"]
    assert (vqa["changed"], vqa["improved"], vqa["worsened"]) == (4, 2, 1)
    assert [(item["question_id"], item["promoted"], item["new"]) for item in vqa["sample"]][:2] == [
        (1, "red", "blue"), (5, "green", "blue")]
    captions = comparison["answers"]["captions"]
    assert captions["changed"] == 1 and captions["sample"][0]["new"] == "there is a big star"
    assert comparison["curves"] == [{"name": "train/loss", "promoted": [[0, 3.0], [1, 2.0], [2, 1.5]],
                                     "new": [[0, 2.5], [1, 1.0]]}]

    page = write_comparison(comparison, tmp_path / "reports")
    assert json.loads((tmp_path / "reports" / "comparison.json").read_text())["answers"]["vqa"]["changed"] == 4
    text = page.read_text()
    assert "what colour is the circle?" in text and "<polyline" in text and "there is a big star" in text
    summary = markdown_summary(comparison, page)
    assert "vqa: 4 of 5 answers changed (2 improved, 1 worse; accuracy 52 -> 60)" in summary
    assert "| what colour is the circle? | red (100%) | blue (0%) | -100 |" in summary


def test_missing_pieces_are_one_line_each(repo, tmp_path):
    # nothing promoted yet: this run alone
    alone = compare_repo(repo, None)
    assert alone["notes"] == ["nothing promoted yet: this run is shown alone"]
    assert alone["answers"] == {} and alone["curves"][0]["promoted"] is None
    # a benchmark added since the tag
    added = {**BENCHMARKS, "vqa-new": BENCHMARKS["vqa"]}
    assert "vqa-new: a benchmark added since promoted/v1, nothing to compare with" in compare_repo(
        repo, "promoted/v1", added)["notes"]
    # the promoted predictions in neither the cache nor a remote
    copy = tmp_path / "project"
    shutil.copytree(repo, copy, symlinks=True)
    shutil.rmtree(copy / ".dvc" / "cache")
    notes = compare_repo(copy, "promoted/v1")["notes"]
    assert len(notes) == 2 and all("\n" not in note for note in notes)
    assert notes[0].startswith("vqa: cannot fetch data/eval/vqa/predictions.json as promoted/v1 recorded it (")
    assert notes[0].endswith("`dvc fetch --all-tags` (or `dvc push` from the machine that has it) to compare "
                             "its answers")
    assert notes[1].startswith("captions: cannot fetch data/eval/captions/predictions.json")


def test_a_file_the_tag_does_not_track_is_refused_in_one_line(repo):
    with pytest.raises(VlkdError, match=r"^cannot fetch data/eval/nothing.json as promoted/v1 recorded it \(.+\); "):
        promoted_json(repo, "promoted/v1", "data/eval/nothing.json")
