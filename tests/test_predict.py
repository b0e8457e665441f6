"""Using a distilled student: `vlkd package` (one folder with its teacher, language model and card),
`load_model`, and `vlkd predict`, with real tiny models; predictions must equal what the evaluation scored."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_evaluate import WORLD_IMAGE, eval_params
from test_evaluate import trained as trained  # noqa: F401 (the module fixture, shared)

from vlkd import load_model
from vlkd.cli import main
from vlkd.config import PackageParams
from vlkd.errors import VlkdError
from vlkd.evaluate import run
from vlkd.inference import answering
from vlkd.inference.asking import Asking
from vlkd.inference.identity import MODEL_RECORD, student_sha256
from vlkd.inference.predict import predict, summary_path
from vlkd.package.build import package


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):  # noqa: F811
    """The evaluation of the module's student in both VQA modes, and its params."""
    params = eval_params(trained, tmp_path_factory.mktemp("eval") / "eval", vqa_modes=["direct", "describe"])
    run.evaluate(params)
    return params


@pytest.fixture(scope="module")
def packaged(trained, evaluated, tiny_world_shards, tmp_path_factory):  # noqa: F811
    world, teacher, plm, root = trained
    output = tmp_path_factory.mktemp("package") / "model"
    package(PackageParams(student=root / "student", teacher=teacher, plm=plm, evaluation=evaluated.output,
                          url_list=world / "urls.parquet", shards=tiny_world_shards[1], output=output))
    return output


def bare_model(trained, params):  # noqa: F811
    world, teacher, plm, root = trained
    return load_model(root / "student", device="cpu", teacher=teacher, plm=plm, asking=Asking.of(params))


def requests_file(world, tmp_path) -> tuple:
    """The benchmark's questions as predict's JSONL, in the benchmark's order; and the questions."""
    questions = json.loads((world / "vqa" / "questions.json").read_text())["questions"]
    images = world / "images" / "eval"
    lines = [json.dumps({"id": q["question_id"], "image": str(images / WORLD_IMAGE.format(image_id=q["image_id"])),
                         "question": q["question"]}) for q in questions]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, questions


def record_asked(monkeypatch) -> list[tuple[str, list[str], torch.Tensor | None]]:
    """Every generation call while it runs: (what, prompts, the image features of each prompt)."""
    calls, answers = [], answering.Generator.answers

    def recording(self, prompts, features, what):
        gathered = None if features is None else features.table[features.rows].clone()
        calls.append((what, list(prompts), gathered))
        return answers(self, prompts, features, what)

    monkeypatch.setattr(answering.Generator, "answers", recording)
    return calls


@pytest.mark.parametrize("mode", ["direct", "describe"])
def test_predict_asks_what_the_evaluation_asked_and_gets_its_answers(trained, evaluated, tmp_path, mode,
                                                                    monkeypatch):  # noqa: F811
    """The tiny student's answers are much alike, so the test compares what the generator was given too: the
    same prompts with the same image features, call by call."""
    world = trained[0]
    source, questions = requests_file(world, tmp_path)
    asked = record_asked(monkeypatch)
    params = eval_params(trained, tmp_path / "eval", vqa_modes=[mode])
    run.evaluate(params.model_copy(update={"benchmarks": {"vqa": params.benchmarks["vqa"]}}))
    evaluated_calls = [call for call in asked if call[0].startswith(f"vqa {mode} image")]
    asked.clear()
    summary = predict(bare_model(trained, evaluated), source, tmp_path / "answers.parquet", task="vqa", mode=mode)
    assert [call[1] for call in asked] == [call[1] for call in evaluated_calls]
    for (_, _, ours), (_, _, theirs) in zip(asked, evaluated_calls, strict=True):
        assert (ours is None and theirs is None) or torch.allclose(ours, theirs, atol=1e-6)
    predicted = {int(row["id"]): row["answer"] for row in pq.read_table(tmp_path / "answers.parquet").to_pylist()}
    scored = {p["question_id"]: p["answer"] for p in json.loads((tmp_path / "eval" / "vqa" / "predictions.json")
                                                                   .read_text())}
    assert predicted == scored
    assert summary["rows"] == summary["answered"] == len(questions) and summary["not_decoded"] == 0


def test_predict_captions_what_the_evaluation_scored(trained, evaluated, tmp_path):  # noqa: F811
    world = trained[0]
    predict(bare_model(trained, evaluated), world / "images" / "eval", tmp_path / "captions.jsonl", task="caption")
    predicted = {row["id"]: row["answer"] for row in map(json.loads, (tmp_path / "captions.jsonl").open())}
    scored = json.loads((evaluated.output / "captions" / "predictions.json").read_text())
    assert predicted == {WORLD_IMAGE.format(image_id=p["image_id"]): p["caption"] for p in scored}


def test_a_package_loads_anywhere_and_answers_as_the_student_with_its_teacher(trained, evaluated, packaged,
                                                                               tmp_path):  # noqa: F811
    moved = shutil.copytree(packaged, tmp_path / "elsewhere")  # nothing outside the folder is needed
    model = load_model(moved, device="cpu")
    record = json.loads((moved / MODEL_RECORD).read_text())
    assert record["identity"]["student_sha256"] == student_sha256(trained[3] / "student") == \
        model.identity["student_sha256"]
    assert model.modes == ["direct", "describe"] and model.asking == Asking.of(evaluated)
    images = sorted((trained[0] / "images" / "eval").glob("*.png"))[:3]
    questions = ["what color is it?"] * 3
    bare = bare_model(trained, evaluated)
    assert model.answer(images, questions) == bare.answer(images, questions)
    assert model.answer([Image.open(path) for path in images], questions, mode="describe") == \
        bare.answer(images, questions, mode="describe")
    assert model.caption(images) == bare.caption(images)


def test_the_model_card_names_teacher_lineage_params_and_scorecard_with_controls(packaged, trained):  # noqa: F811
    card = (packaged / "README.md").read_text()
    record = json.loads((packaged / MODEL_RECORD).read_text())
    assert card.startswith("---\nlibrary_name: vlkd\n")
    for heading in ("## Use", "## Distilled from", "## Data lineage", "## Scorecard", "## Distillation params"):
        assert heading in card
    assert record["lineage"]["url_list"]["sha256"][:16] in card
    assert "not filtered" in card and "30 images in 3 shards" in card
    distilled = json.loads((trained[3] / "student" / "distill-metrics.json").read_text())
    assert f"distilled for {distilled['steps']} steps (2 epochs) on {distilled['trained_rows']['all']} of the" in card
    vqa = record["scorecard"]["vqa"]["modes"]["direct"]
    assert f"| vqa | direct | {vqa['overall']:.2f} | {vqa['controls']['blank']['overall']:.2f} |" in card
    assert "from vlkd import load_model" in card
    assert "Student: VLKD (the paper's recipe).\n" in card


def test_predict_counts_and_reports_an_undecodable_image_and_tags_rows_with_the_model(trained, evaluated, packaged,
                                                                                      tmp_path):  # noqa: F811
    folder = tmp_path / "mine"
    folder.mkdir()
    for path in sorted((trained[0] / "images" / "eval").glob("*.png"))[:2]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    result = CliRunner().invoke(main, ["predict", str(folder), "--model", str(packaged), "--device", "cpu",
                                       "--question", "what color is it?", "--output", str(tmp_path / "out.parquet")])
    assert result.exit_code == 0, result.output
    rows = {row["id"]: row for row in pq.read_table(tmp_path / "out.parquet").to_pylist()}
    assert set(rows) == {"broken.jpg", *(path.name for path in folder.glob("*.png"))}
    assert rows["broken.jpg"]["answer"] is None and rows["broken.jpg"]["error"]
    identity = json.loads((packaged / MODEL_RECORD).read_text())["identity"]
    assert {row["student_sha256"] for row in rows.values()} == {identity["student_sha256"]}
    assert all(row["error"] is None and row["answer"] is not None for key, row in rows.items() if key != "broken.jpg")
    summary = json.loads(summary_path(tmp_path / "out.parquet").read_text())
    assert (summary["rows"], summary["answered"], summary["not_decoded"]) == (3, 2, 1)
    assert "2 of 3 image(s) answered (1 not decodable)" in result.output


@pytest.mark.parametrize("case", ["no images", "student without its teacher", "bad question file", "no question"])
def test_bad_input_is_one_clear_line(case, trained, packaged, tmp_path):  # noqa: F811
    source, model, extra = tmp_path / "in", packaged, ["--question", "what?"]
    source.mkdir()
    if case == "student without its teacher":
        model = trained[3] / "student"
        shutil.copy(next((trained[0] / "images" / "eval").glob("*.png")), source / "a.png")
    elif case == "bad question file":
        source = tmp_path / "requests.jsonl"
        source.write_text('{"image": "a.png", "question": "what?"}\nnot json\n')
    elif case == "no question":
        shutil.copy(next((trained[0] / "images" / "eval").glob("*.png")), source / "a.png")
        extra = []
    result = CliRunner().invoke(main, ["predict", str(source), "--model", str(model), "--device", "cpu",
                                       "--output", str(tmp_path / "out.jsonl"), *extra])
    assert result.exit_code == 2
    message = result.output.strip()
    assert message.startswith("vlkd: error: ") and "\n" not in message
    expected = {"no images": "holds no images", "student without its teacher": "without its teacher",
                "bad question file": "line 2 is not JSON", "no question": "no questions"}[case]
    assert expected in message
    assert not (tmp_path / "out.jsonl").exists()


def test_a_packaged_record_that_cannot_say_how_to_ask_is_one_clear_error():
    record = {"vqa_prompt": "Question: {question} Answer: <mask>", "caption_prompt": "A picture of <mask>",
              "describe_prompt": "A picture of <mask>", "num_beams": 5, "vqa_max_new_tokens": 10,
              "caption_max_new_tokens": 30, "batch_size": 64}
    assert Asking.of(record).decoding == "free"  # packaged before decoding was a setting
    assert Asking.of({**record, "decoding": "forced"}).decoding == "forced"
    with pytest.raises(VlkdError, match="decoding 'greedy'; it is one of free, forced"):
        Asking.of({**record, "decoding": "greedy"}, "the model")
    with pytest.raises(VlkdError, match="num_beams missing"):
        Asking.of({k: v for k, v in record.items() if k != "num_beams"}, "the model")
