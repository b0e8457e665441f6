"""The official VQA accuracy on hand-scored cases (expected values worked out by hand in the comments), the
official quirks, aggregation and rounding, the synthetic world's files, and every bad input through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlkd.cli import main
from vlkd.config import SynthParams
from vlkd.data.vqa_metric import process_punctuation, question_accuracy, question_type_prior, score_vqa
from vlkd.errors import VlkdError
from vlkd.world.synth import generate_world


def humans(*groups: tuple[int, str]) -> list[dict]:
    """Human answer records in the published format, e.g. humans((3, "red"), (7, "blue"))."""
    answers = [text for count, text in groups for _ in range(count)]
    return [{"answer": text, "answer_confidence": "yes", "answer_id": index + 1} for index, text in enumerate(answers)]


def accuracy(groups: list[tuple[int, str]], prediction: str, normalize: str = "official") -> float:
    return question_accuracy(humans(*groups), prediction, normalize)


@pytest.mark.parametrize(
    ("groups", "prediction", "official", "always"),
    [
        # All ten humans agree, so the official script compares the prediction as written: "2" != "two" -> 0.
        # Normalising always, both become "2": each human sees 9 matches -> min(1, 9/3) = 1 -> 1.0.
        ([(10, "two")], "2", 0.0, 1.0),
        ([(10, "two")], "two", 1.0, 1.0),
        ([(10, "two")], " two\n", 1.0, 1.0),  # cleaning (tabs/newlines to spaces, strip) always applies
        ([(10, "yes")], "Yes", 0.0, 1.0),  # no lowercasing either when the humans agree
        ([(10, "yes")], "yes.", 0.0, 1.0),
        ([(10, "a dog")], "dog", 0.0, 1.0),  # articles
        ([(10, "don't")], "dont", 0.0, 1.0),  # contractions: "dont" -> "don't"
        # "two " is cleaned to "two" before the agreement test: still unanimous, so "2" still scores 0.
        ([(9, "two"), (1, "two ")], "2", 0.0, 1.0),
        # The humans disagree, so everything is normalised: number words ("two" -> "2") ...
        ([(9, "two"), (1, "2")], "two", 1.0, 1.0),
        ([(9, "two"), (1, "2")], "2", 1.0, 1.0),
        ([(5, "none"), (5, "0")], "zero", 1.0, 1.0),
        # ... articles ("a dog", "the dog" -> "dog") ...
        ([(5, "a dog"), (5, "dog")], "the dog", 1.0, 1.0),
        # ... punctuation: "yes." loses its period, "Yes!" becomes "yes " then "yes" ...
        ([(9, "yes"), (1, "yes.")], "Yes!", 1.0, 1.0),
        # ", " touches a space so the comma is deleted; in "red,white" it becomes a space: both "red white".
        ([(5, "red, white"), (5, "red white")], "red,white", 1.0, 1.0),
        # a digit,digit anywhere deletes the commas: "1,000" -> "1000".
        ([(9, "1000"), (1, "1,000")], "1,000", 1.0, 1.0),
        # ... and contractions: "dont" -> "don't", while "don't" keeps its apostrophe (not in the punctuation list).
        ([(5, "dont"), (5, "don't")], "dont", 1.0, 1.0),
        # Leave-one-out: 3 of 10 humans match. The 7 others each see 3 matches -> 1; the 3 matching humans each
        # see 2 -> 2/3. Mean = (7 * 1 + 3 * 2/3) / 10 = 0.9.
        ([(3, "red"), (7, "blue")], "red", 0.9, 0.9),
        # 1 of 10: the matching human sees 0 -> 0; the 9 others see 1 -> 1/3. Mean = 9 * (1/3) / 10 = 0.3.
        ([(1, "red"), (9, "blue")], "red", 0.3, 0.3),
        # 2 of 10: the 2 matching humans see 1 -> 1/3; the 8 others see 2 -> 2/3. Mean = (2/3 + 16/3) / 10 = 0.6.
        ([(2, "red"), (8, "blue")], "red", 0.6, 0.6),
        # 4 of 10: everyone sees at least 3 matches -> 1.0.
        ([(4, "red"), (6, "blue")], "red", 1.0, 1.0),
        # No partial credit for overlapping words: "red car" matches nobody -> 0.
        ([(5, "red"), (5, "car")], "red car", 0.0, 0.0),
    ],
)
def test_hand_scored_questions(groups, prediction, official, always):
    assert accuracy(groups, prediction) == pytest.approx(official, abs=1e-12)
    assert accuracy(groups, prediction, "always") == pytest.approx(always, abs=1e-12)


def test_the_period_strip_stops_after_32_periods_like_the_official_script():
    # vqaEval.py passes re.UNICODE (= 32) where re.sub takes `count`: of 40 periods, 8 survive.
    assert process_punctuation("a." * 40).count(".") == 8


def annotation(question_id: int, groups: list[tuple[int, str]], question_type: str, answer_type: str) -> dict:
    return {"question_id": question_id, "image_id": question_id // 10, "question_type": question_type,
            "answer_type": answer_type, "multiple_choice_answer": groups[0][1], "answers": humans(*groups)}


QUESTIONS = {"questions": [{"question_id": qid, "image_id": qid // 10, "question": "?"} for qid in (10, 11, 20, 21)]}
ANNOTATIONS = {"annotations": [
    annotation(10, [(3, "red"), (7, "blue")], "what color is the", "other"),  # "red" -> 0.9
    annotation(11, [(1, "red"), (9, "blue")], "what color is the", "other"),  # "red" -> 0.3
    annotation(20, [(10, "yes")], "is the", "yes/no"),  # "yes" -> 1.0
    annotation(21, [(10, "two")], "how many", "number"),  # "2" -> 0 (official), 1.0 (always)
]}
PREDICTIONS = [{"question_id": 10, "answer": "red"}, {"question_id": 11, "answer": "red"},
               {"question_id": 20, "answer": "yes"}, {"question_id": 21, "answer": "2"}]


def test_aggregation_per_type_and_rounding():
    result = score_vqa(QUESTIONS, ANNOTATIONS, PREDICTIONS)
    # overall = round(100 * (0.9 + 0.3 + 1 + 0) / 4, 2) = 55.0; "what color is the" and "other" = 100 * 1.2 / 2.
    assert result["overall"] == 55.0
    assert result["perQuestionType"] == {"what color is the": 60.0, "is the": 100.0, "how many": 0.0}
    assert result["perAnswerType"] == {"other": 60.0, "yes/no": 100.0, "number": 0.0}
    assert result["perQuestion"] == {10: 90.0, 11: 30.0, 20: 100.0, 21: 0.0}
    assert result["questions"] == 4 and result["normalize"] == "official"
    always = score_vqa(QUESTIONS, ANNOTATIONS, PREDICTIONS, normalize="always")
    assert always["overall"] == 80.0 and always["perAnswerType"]["number"] == 100.0  # (0.9 + 0.3 + 1 + 1) / 4
    # Three questions: (0.9 + 0.3 + 1) / 3 = 0.7333... -> 73.33 (two decimals, as round(100 * x, 2)).
    three = {"annotations": ANNOTATIONS["annotations"][:3]}
    questions = {"questions": QUESTIONS["questions"][:3]}
    assert score_vqa(questions, three, PREDICTIONS[:3])["overall"] == 73.33


def test_the_question_type_prior_answers_each_type_with_its_most_frequent_human_answer():
    # "what color is the": blue 16 of 20 human answers; "how many": "two" and "2" are one answer after
    # normalisation (10 vs "three" 10 -> tie, alphabetical: "2" < "3"); "is the": yes.
    annotations = {"annotations": [*ANNOTATIONS["annotations"],
                                   annotation(22, [(10, "three")], "how many", "number")]}
    prior = question_type_prior(annotations)
    assert prior == [{"question_id": 10, "answer": "blue"}, {"question_id": 11, "answer": "blue"},
                     {"question_id": 20, "answer": "yes"}, {"question_id": 21, "answer": "2"},
                     {"question_id": 22, "answer": "2"}]
    questions = {"questions": [*QUESTIONS["questions"], {"question_id": 22, "image_id": 2, "question": "?"}]}
    # 10: 7 blue -> 1.0; 11: 9 blue -> 1.0; 20: 1.0; 21: "2" vs ten "two", official: 0; 22: 0 -> 3/5.
    assert score_vqa(questions, annotations, prior)["overall"] == 60.0


def test_unknown_normalize_mode_is_refused():
    with pytest.raises(VlkdError, match="normalize"):
        score_vqa(QUESTIONS, ANNOTATIONS, PREDICTIONS, normalize="sometimes")


def write_inputs(folder: Path, questions=QUESTIONS, annotations=ANNOTATIONS, predictions=PREDICTIONS) -> list[str]:
    """The three input files (a str is written as is, anything else as JSON) and the CLI arguments for them."""
    paths = {"questions": questions, "annotations": annotations, "predictions": predictions}
    for name, content in paths.items():
        (folder / f"{name}.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return [arg for name in paths for arg in (f"--{name}", str(folder / f"{name}.json"))]


def test_cli_writes_the_official_summary(tmp_path):
    output = tmp_path / "out" / "metrics.json"
    result = CliRunner().invoke(main, ["vqa-score", *write_inputs(tmp_path), "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "VQA accuracy 55.00 over 4 questions" in result.stdout
    metrics = json.loads(output.read_text())
    assert metrics == {"overall": 55.0, "questions": 4, "normalize": "official",
                       "perQuestionType": {"what color is the": 60.0, "is the": 100.0, "how many": 0.0},
                       "perAnswerType": {"other": 60.0, "yes/no": 100.0, "number": 0.0}}
    result = CliRunner().invoke(main, ["vqa-score", *write_inputs(tmp_path), "--output", str(output),
                                       "--normalize", "always"])
    assert result.exit_code == 0 and json.loads(output.read_text())["overall"] == 80.0


def test_the_synthetic_worlds_files_score(tmp_path):
    world = tmp_path / "world"
    generate_world(world, SynthParams(images=20, eval_images=10, shifted_images=5, text_scenes=50,
                                      pretrain_images=12, image_size=64))
    annotations = json.loads((world / "vqa" / "annotations.json").read_text())
    predictions = [{"question_id": entry["question_id"], "answer": entry["multiple_choice_answer"]}
                   for entry in annotations["annotations"]]
    (tmp_path / "predictions.json").write_text(json.dumps(predictions))
    output = tmp_path / "metrics.json"
    result = CliRunner().invoke(main, ["vqa-score", "--questions", str(world / "vqa" / "questions.json"),
                                       "--annotations", str(world / "vqa" / "annotations.json"),
                                       "--predictions", str(tmp_path / "predictions.json"), "--output", str(output)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(output.read_text())
    assert metrics["questions"] == len(predictions)
    # The world's canonical answer is given by at least 6 of the 10 humans (at most 4 differ), so with
    # any one human left out at least 5 >= 3 others match it: every question scores exactly 100.
    entries = annotations["annotations"]
    assert all(sum(a["answer"] == e["multiple_choice_answer"] for a in e["answers"]) >= 6 for e in entries)
    assert metrics["overall"] == 100.0
    assert metrics["perAnswerType"] == {kind: 100.0 for kind in {e["answer_type"] for e in entries}}
    assert metrics["perQuestionType"] == {kind: 100.0 for kind in {e["question_type"] for e in entries}}


def without(mapping: dict, key: str) -> dict:
    return {name: value for name, value in mapping.items() if name != key}


BAD_INPUTS = {
    "malformed JSON": ({"predictions": '[{"question_id": 10, "answer": "red"},\n  oops]'},
                       "predictions.json is not valid JSON: Expecting value at line 2, column 3"),
    "not the annotation format": ({"annotations": {"questions": []}}, "annotations.json has no 'annotations' list"),
    "annotation without answers": (
        {"annotations": {"annotations": [without(ANNOTATIONS["annotations"][0], "answers")]}}, "annotation #0 in"),
    "prediction without answer": ({"predictions": [*PREDICTIONS[:3], {"question_id": 21}]},
                                  "prediction #3 in"),
    "predictions not a list": ({"predictions": {"question_id": 10, "answer": "red"}}, "predictions.json is not a list"),
    "unknown question ids": ({"predictions": [*PREDICTIONS, {"question_id": 99, "answer": "x"},
                                              {"question_id": 98, "answer": "x"}]},
                             "2 prediction(s) in"),
    "missing predictions": ({"predictions": PREDICTIONS[1:3]}, "2 question(s) of"),
    "duplicate question ids": ({"predictions": [*PREDICTIONS, PREDICTIONS[0]]},
                               "question id 10 has 2 predictions in"),
    "answer not a string": ({"predictions": [*PREDICTIONS[:3], {"question_id": 21, "answer": 2}]},
                            "the prediction for question id 21 in"),
    "questions of another split": ({"questions": {"questions": QUESTIONS["questions"][:3]}},
                                   "1 annotated question(s) in"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_inputs_give_one_line_and_exit_2(tmp_path, case):
    overrides, message = BAD_INPUTS[case]
    args = write_inputs(tmp_path, **overrides)
    result = CliRunner().invoke(main, ["vqa-score", *args, "--output", str(tmp_path / "metrics.json")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("vlkd: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_bad_input_messages_name_an_example_id(tmp_path):
    with pytest.raises(VlkdError, match=r"e\.g\. question id 98; predict on the questions of the same split"):
        score_vqa(QUESTIONS, ANNOTATIONS, [*PREDICTIONS, {"question_id": 99, "answer": "x"},
                                           {"question_id": 98, "answer": "x"}])
    with pytest.raises(VlkdError, match=r"e\.g\. question id 10; predict every question"):
        score_vqa(QUESTIONS, ANNOTATIONS, PREDICTIONS[1:3])
    with pytest.raises(VlkdError, match=r"is not a string \(int\)"):
        score_vqa(QUESTIONS, ANNOTATIONS, [*PREDICTIONS[:3], {"question_id": 21, "answer": 2}])


def test_a_missing_file_is_one_line(tmp_path):
    args = write_inputs(tmp_path)
    args[args.index("--annotations") + 1] = str(tmp_path / "nope.json")
    result = CliRunner().invoke(main, ["vqa-score", *args, "--output", str(tmp_path / "metrics.json")])
    assert result.exit_code == 2 and result.stderr == f"vlkd: error: {tmp_path / 'nope.json'} does not exist; " \
        "check the path\n"
