"""The evaluation stage end to end on the tiny world: a tiny student distilled from a random teacher's
features, real generation, the official scorers, the report, skip-if-unchanged and bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import TEST_MODEL, make_random_teacher, make_tiny_plm

from vlkd.cli import main
from vlkd.config import BenchmarkSpec, DistillParams, EvaluateParams
from vlkd.data.feature_store import FeatureStore
from vlkd.data.feature_writer import Encoding, extract_features
from vlkd.data.image_features import BLANK_KEY
from vlkd.data.vqa_metric import score_vqa
from vlkd.distill.train import distill
from vlkd.errors import VlkdError
from vlkd.evaluate import run
from vlkd.evaluate.images import image_features
from vlkd.evaluate.ladder import fitted_evidence, reading_length
from vlkd.inference import answering
from vlkd.io import sha256_file
from vlkd.models import student as student_module
from vlkd.models.infill import fill_prompt
from vlkd.models.student import Student, load_language_model
from vlkd.models.teacher import load_teacher, resolve_teacher
from vlkd.record import RECORD
from vlkd.teacher.build import MANIFEST, SOURCE_FILE

WORLD_IMAGE = "{image_id:06d}.png"  # the synthetic world's image file names


def teacher_folder(checkpoint):
    (checkpoint.parent / MANIFEST).write_text(json.dumps(
        {"model": TEST_MODEL, "pretrained": checkpoint.name, "source": SOURCE_FILE}))
    return checkpoint.parent


@pytest.fixture(scope="module")
def trained(tiny_world_shards, random_teacher, tmp_path_factory):
    """(world, teacher folder, language model, student) made once for the module."""
    world, shards = tiny_world_shards
    root = tmp_path_factory.mktemp("evaluate")
    teacher = load_teacher(TEST_MODEL, str(random_teacher))
    extract_features(shards, root / "features", teacher,
                     Encoding(batch_size=8, num_workers=0, device="cpu", precision="auto", image_tokens=False))
    captions = [c for batch in FeatureStore(root / "features").iter_batches(64) for c in batch["caption"]]
    captions += (world / "text" / "train.txt").read_text().splitlines()
    plm = make_tiny_plm(root / "plm", captions)
    heldout = world / "text" / "heldout.txt"  # recorded as `vlkd plm` records it: evaluation measures retention on it
    (plm / "vlkd-plm.json").write_text(json.dumps({"params": {"heldout": str(heldout)},
                                                   "inputs": {"heldout": sha256_file(heldout)}}))
    distill(DistillParams(features=root / "features", kept=None, plm=plm, output=root / "student",
                          checkpoints=root / "ckpt",
                          plots=root / "curves", epochs=2, batch_size=6, device="cpu"))
    return world, teacher_folder(random_teacher), plm, root


def eval_params(trained, output, **changes) -> EvaluateParams:
    world, teacher, plm, root = trained
    benchmarks = {
        "vqa": BenchmarkSpec(task="vqa", images=world / "images" / "eval", questions=world / "vqa" / "questions.json",
                             annotations=world / "vqa" / "annotations.json", image_pattern=WORLD_IMAGE),
        "captions": BenchmarkSpec(task="caption", images=world / "images" / "eval",
                                  annotations=world / "captions" / "annotations.json", image_pattern=WORLD_IMAGE),
    }
    base = dict(student=root / "student", plm=plm, teacher=teacher, output=output, cache=root / "cache",
                benchmarks=benchmarks, curves=root / "curves",
                num_beams=2, vqa_max_new_tokens=3, caption_max_new_tokens=4, batch_size=16, report_samples=3,
                vqa_modes=["describe"], device="cpu")
    return EvaluateParams(**{**base, **changes})


def test_evaluation_writes_official_predictions_metrics_controls_and_a_report(trained, tmp_path):
    world = trained[0]
    params = eval_params(trained, tmp_path / "eval", vqa_modes=["describe", "direct"])
    metrics = run.evaluate(params)

    questions_file = json.loads((world / "vqa" / "questions.json").read_text())
    annotations = json.loads((world / "vqa" / "annotations.json").read_text())
    questions = questions_file["questions"]
    predictions = json.loads((tmp_path / "eval" / "vqa" / "predictions.json").read_text())
    assert sorted(p["question_id"] for p in predictions) == sorted(q["question_id"] for q in questions)
    assert all(set(p) == {"question_id", "answer"} and isinstance(p["answer"], str) for p in predictions)
    official = score_vqa(questions_file, annotations, predictions)
    assert {key: metrics["vqa"][key] for key in ("overall", "perAnswerType", "perQuestionType")} == \
        {key: official[key] for key in ("overall", "perAnswerType", "perQuestionType")}
    for control in ("blank", "shuffled", "text_only", "prior"):
        written = json.loads((tmp_path / "eval" / "vqa" / f"predictions_{control}.json").read_text())
        # Each control's numbers are the official accuracy of the predictions written for it.
        scored = score_vqa(questions_file, annotations, written)
        assert metrics["vqa"]["controls"][control] == \
            {"overall": scored["overall"], "perAnswerType": scored["perAnswerType"]}, control
    # Every mode is scored with every control; the headline (the first) is also the top level.
    assert list(metrics["vqa"]["modes"]) == ["describe", "direct"] and metrics["vqa"]["mode"] == "describe"
    describe = dict(metrics["vqa"]["modes"]["describe"])
    assert describe.pop("gap_closed") == {}  # no rung without the benchmark's captions or descriptions
    assert describe == {key: metrics["vqa"][key] for key in ("overall", "perAnswerType", "controls")}
    for condition in ("image", "blank", "shuffled", "text_only"):
        suffix = "" if condition == "image" else f"_{condition}"
        written = json.loads((tmp_path / "eval" / "vqa" / "direct" / f"predictions{suffix}.json").read_text())
        scored = score_vqa(questions_file, annotations, written)["overall"]
        direct = metrics["vqa"]["modes"]["direct"]
        assert (direct["overall"] if condition == "image" else direct["controls"][condition]["overall"]) == scored
    assert metrics["vqa"]["modes"]["direct"]["controls"]["prior"] == metrics["vqa"]["controls"]["prior"]
    captions = json.loads((tmp_path / "eval" / "captions" / "predictions.json").read_text())
    assert all(set(c) == {"image_id", "caption"} for c in captions) and len(captions) == 6

    assert set(metrics["vqa"]) >= {"overall", "perAnswerType", "perQuestionType", "controls", "questions"}
    assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(metrics["captions"])
    assert metrics["retention"]["student_loss"] > 0 and metrics["retention"]["language_model_loss"] > 0
    # the same held-out text read behind the blank image's prefix, as the student was distilled
    assert 0 < metrics["retention"]["student_loss_blank_image"] != metrics["retention"]["student_loss"]
    # the student was distilled with the code's defaults, the paper's recipe, and the scorecard says so
    assert metrics["recipe"] == {"name": "VLKD (the paper's recipe)", "objectives": ["TTDM", "ITCL", "ICTI"],
                                 "extensions": []}
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "Student: VLKD (the paper&#x27;s recipe)" in report and "free decoding (the answer is cut out" in report
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics

    described = json.loads((tmp_path / "eval" / "vqa" / "descriptions_image.json").read_text())
    assert sorted(d["image_id"] for d in described) == sorted({q["image_id"] for q in questions})
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "described as:" in report
    assert "VQA accuracy, describe" in report and "VQA accuracy, direct" in report and "direct: " in report
    assert report.count("data:image/png;base64") == 6  # 3 VQA and 3 caption samples
    assert questions[0]["question"].split()[0] in report and "<svg" in report  # questions and curves

    # The shuffled control gives each question another image of the split.
    shuffle = run._derangement(sorted({q["image_id"] for q in questions}), seed=0)
    assert all(image != other for image, other in shuffle.items())


def record_student_generation(monkeypatch) -> list[dict]:
    """Every Student.generate call of an evaluation, in order: its features (None: no image), prompts, the
    student, and the encoder inputs BART generated from."""
    calls: list[dict] = []
    generate, generate_infills = Student.generate, student_module.generate_infills

    def recording_generate(self, image_features, prompts, *args):
        calls.append({"student": self, "features": image_features, "prompts": list(prompts)})
        return generate(self, image_features, prompts, *args)

    def recording_generate_infills(bart, tokenizer, encoder_inputs, *args):
        calls[-1]["encoder"] = encoder_inputs
        return generate_infills(bart, tokenizer, encoder_inputs, *args)

    monkeypatch.setattr(Student, "generate", recording_generate)
    monkeypatch.setattr(student_module, "generate_infills", recording_generate_infills)
    return calls


@pytest.mark.parametrize("mode", ["direct", "describe"])
def test_direct_mode_answers_with_the_image_prefix_in_front_of_the_question(trained, tmp_path, monkeypatch,
                                                                             random_teacher, mode):
    """direct (the paper's zero-shot VQA): the student answers [its image's prefix ; the question prompt].
    describe: the student only ever sees the describe prompt; no question reaches it with an image."""
    world, root = trained[0], trained[3]
    params = eval_params(trained, tmp_path / "eval", vqa_modes=[mode], num_beams=1)
    params = params.model_copy(update={"benchmarks": {"vqa": params.benchmarks["vqa"]}})
    calls = record_student_generation(monkeypatch)
    metrics = run.evaluate(params)
    assert metrics["vqa"]["mode"] == mode
    assert set(metrics["vqa"]["controls"]) == {"blank", "shuffled", "text_only", "prior"}

    questions = json.loads((world / "vqa" / "questions.json").read_text())["questions"]
    question_prompts = [fill_prompt(params.vqa_prompt, question=q["question"]) for q in questions]
    assert calls and all(call["features"] is not None for call in calls)  # text_only never runs the student
    prompts = [prompt for call in calls for prompt in call["prompts"]]
    if mode == "describe":
        assert set(prompts) == {fill_prompt(params.describe_prompt)}
        assert not any(q["question"] in prompt for q in questions for prompt in prompts)
        return
    # The image condition first, each question once; then the blank and shuffled conditions' inputs that
    # no condition before had (a repeated input is answered once).
    assert prompts[:len(questions)] == question_prompts
    assert len(questions) < len(prompts) < 3 * len(questions) and set(prompts[len(questions):]) <= set(question_prompts)
    image_ids = sorted({q["image_id"] for q in questions})
    features, _ = image_features(params.benchmarks["vqa"], image_ids, load_teacher(TEST_MODEL, str(random_teacher)),
                                 root / "cache" / "vqa", patch=False, device="cpu")
    fed, begin = [], 0
    for call in calls:
        if begin < len(questions):  # the image condition: each question with its own image's features
            fed.append(call["features"])
        begin += len(call["prompts"])
    assert torch.equal(torch.cat(fed), torch.stack([features[q["image_id"]] for q in questions]))
    for call in calls:  # what BART encodes: the visual prefix W_v(features), then the prompt's tokens
        student, encoded = call["student"], call["encoder"]
        tokens = student.tokenizer(call["prompts"], return_tensors="pt", padding=True)
        prefix = student.visual_prefix(call["features"])
        assert "input_ids" not in encoded and encoded["inputs_embeds"].shape[1] == prefix.shape[1] + \
            tokens.input_ids.shape[1]
        torch.testing.assert_close(encoded["inputs_embeds"][:, :prefix.shape[1]], prefix, rtol=0, atol=0)
        torch.testing.assert_close(encoded["inputs_embeds"][:, prefix.shape[1]:],
                                   student.bart.get_encoder().embed_tokens(tokens.input_ids), rtol=0, atol=0)
        assert torch.equal(encoded["attention_mask"][:, :prefix.shape[1]], torch.ones(prefix.shape[:2]).long())
        assert torch.equal(encoded["attention_mask"][:, prefix.shape[1]:], tokens.attention_mask)


def record_model_batches(monkeypatch) -> tuple[dict[str, list[torch.Tensor]], dict[str, int]]:
    """({what the generator runs: the feature batches the student got}, {what: rows of the table they
    were gathered from}), filled while the evaluation runs."""
    batches: dict[str, list[torch.Tensor]] = {}
    table_rows: dict[str, int] = {}
    answers, generate = answering.Generator.answers, Student.generate
    running = []

    def recording_answers(self, prompts, features, what):
        if features is not None:
            table_rows[what] = len(features.table)
        running.append(what)
        try:
            return answers(self, prompts, features, what)
        finally:
            running.pop()

    def recording_generate(self, image_features, prompts, *args):
        if image_features is not None:
            batches.setdefault(running[-1], []).append(image_features)
        return generate(self, image_features, prompts, *args)

    monkeypatch.setattr(answering.Generator, "answers", recording_answers)
    monkeypatch.setattr(Student, "generate", recording_generate)
    return batches, table_rows


@pytest.mark.parametrize("mode", ["direct", "describe"])
def test_features_are_held_once_per_image_and_each_batch_is_gathered_from_them(trained, tmp_path, monkeypatch,
                                                                                random_teacher, mode):
    """VQAv2 has ~5 questions per image: a features tensor stacked per question, for each condition, would
    take hundreds of GB with patch tokens. The student must get batches gathered from one row per image
    (and the blank image's), each batch its own tensor, with the features a per-question stack had."""
    world, root = trained[0], trained[3]
    params = eval_params(trained, tmp_path / "eval", vqa_modes=[mode], batch_size=4)
    if mode == "describe":  # captions are generated the same way in both modes
        params = params.model_copy(update={"benchmarks": {"vqa": params.benchmarks["vqa"]}})
    questions = json.loads((world / "vqa" / "questions.json").read_text())["questions"]
    image_ids = sorted({q["image_id"] for q in questions})
    assert len(questions) > len(image_ids) + 1  # so a table per question is told apart from one per image
    batches, table_rows = record_model_batches(monkeypatch)
    run.evaluate(params)

    assert set(table_rows.values()) == {len(image_ids) + 1}, table_rows
    for what, fed in batches.items():
        for batch in fed:  # not a slice or an expanded view of a bigger (per-question) tensor
            held, own = batch.untyped_storage().nbytes(), batch.numel() * batch.element_size()
            assert len(batch) <= params.batch_size and held == own, f"{what}: {held} bytes held for {own}"

    features, blank = image_features(params.benchmarks["vqa"], image_ids, load_teacher(TEST_MODEL, str(random_teacher)),
                                     root / "cache" / "vqa", patch=False, device="cpu")
    other = run._derangement(image_ids, params.seed)
    image_of = {"image": lambda q: q["image_id"], "blank": lambda q: None, "shuffled": lambda q: other[q["image_id"]]}
    generated = set()
    for condition, image in image_of.items():
        if mode == "direct":  # each distinct (image, question) once, in order: a repeat is answered without a batch
            inputs = [(image(q), q["question"]) for q in questions]
            new = [key for key in dict.fromkeys(inputs) if key not in generated]
            generated.update(new)
            rows = [blank if image_id is None else features[image_id] for image_id, _ in new]
            fed = batches.get(f"vqa direct {condition}", [])
            assert torch.equal(torch.cat(fed) if fed else torch.empty(0), torch.stack(rows) if rows else
                               torch.empty(0)), condition
            assert condition != "blank" or len(new) < len(questions)  # the tiny world's questions repeat
        else:  # each distinct image described once, in the order torch.unique gives, and once for every condition
            rows = [blank if image(q) is None else features[image(q)] for q in questions]
            new = [row for row in torch.unique(torch.stack(rows), dim=0) if not any(torch.equal(row, seen)
                                                                                   for seen in generated)]
            generated.update(new)
            fed = batches.get(f"vqa describe {condition} describe", [])
            assert torch.equal(torch.cat(fed) if fed else torch.empty(0), torch.stack(new) if new else
                               torch.empty(0)), condition
            assert condition != "shuffled" or not new  # the shuffled images are the images, described before
    if mode == "direct":
        assert torch.equal(torch.cat(batches["captions image"]), torch.stack([features[i] for i in image_ids]))


def test_rows_are_grouped_by_value_in_the_order_torch_unique_gives():
    """Describe mode describes each distinct image once, in torch.unique's order, without copying features."""
    table = torch.randint(0, 3, (40, 3, 2), generator=torch.Generator().manual_seed(0)).float()
    table[5], table[17] = table[2], table[2]  # duplicates
    table[9] = torch.tensor([[-0.0, 1.0], [2.0, -0.0], [1.0, 1.0]])
    table[30] = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])  # equal to row 9 as torch.unique has it
    rows = [row for row in range(40) if row % 7]
    groups = answering.rows_by_value(table, rows)
    distinct, inverse = torch.unique(table[rows], dim=0, return_inverse=True)
    assert torch.equal(torch.stack([table[group[0]] for group in groups]), distinct)
    group_of = {row: k for k, group in enumerate(groups) for row in group}
    assert sorted(group_of) == rows and [group_of[row] for row in rows] == inverse.tolist()
    assert any(len(group) > 1 for group in groups)


def test_an_unchanged_rerun_is_skipped_and_a_changed_param_is_not(trained, tmp_path, monkeypatch):
    """One real benchmark (the tiny world's VQA): a rerun that generated, scored or measured retention
    again would trip a wire; a changed param generates again and writes the folder anew."""
    params = eval_params(trained, tmp_path / "eval", vqa_modes=["direct"], num_beams=2)
    params = params.model_copy(update={"benchmarks": {"vqa": params.benchmarks["vqa"]}})
    answered = []
    answers = answering.Generator.answers

    def counting_answers(self, prompts, features, what):
        answered.append(what)
        return answers(self, prompts, features, what)

    monkeypatch.setattr(answering.Generator, "answers", counting_answers)
    first = run.evaluate(params)
    assert len(answered) == 4 and first["vqa"]["questions"] > 0  # image, blank, shuffled, text_only
    predictions = tmp_path / "eval" / "vqa" / "predictions.json"
    written = predictions.stat().st_mtime_ns

    with monkeypatch.context() as tripwires:
        for name in ("_vqa", "_captions", "_retention", "score_vqa"):
            tripwires.setattr(run, name, lambda *a, name=name, **k: pytest.fail(f"an unchanged rerun ran {name}"))
        tripwires.setattr(answering.Generator, "answers", lambda *a: pytest.fail("an unchanged rerun generated"))
        assert run.evaluate(params) == first
    assert predictions.stat().st_mtime_ns == written

    answered.clear()
    changed = run.evaluate(params.model_copy(update={"num_beams": 1}))
    assert len(answered) == 4  # generated again, with greedy search
    assert predictions.stat().st_mtime_ns != written
    manifest = json.loads((tmp_path / "eval" / run.MANIFEST).read_text())
    record = json.loads((tmp_path / "eval" / RECORD).read_text())
    assert record["params"]["num_beams"] == 1 and manifest["metrics"] == changed
    assert changed["retention"] == first["retention"]  # the same student and text: the same losses


def test_image_features_and_the_blank_image_are_cached_as_feature_parquet(trained, tmp_path, random_teacher):
    spec = eval_params(trained, tmp_path).benchmarks["captions"]
    teacher = load_teacher(TEST_MODEL, str(random_teacher))
    features, blank = image_features(spec, list(range(6)), teacher, tmp_path / "cache", patch=False, device="cpu")
    assert sorted(features) == list(range(6)) and blank.shape == features[0].shape == (32,)
    stores = list((tmp_path / "cache").glob("*/features"))
    assert len(stores) == 1
    keys = [k for batch in FeatureStore(stores[0]).iter_batches(64) for k in batch["key"]]
    assert sorted(keys) == sorted([BLANK_KEY, *map(str, range(6))])
    written = {path: path.stat().st_mtime_ns for path in stores[0].glob("*.parquet")}
    again, _ = image_features(spec, list(range(6)), teacher, tmp_path / "cache", patch=False, device="cpu")
    assert all((again[i] == features[i]).all() for i in features)
    assert {path: path.stat().st_mtime_ns for path in stores[0].glob("*.parquet")} == written  # nothing embedded

    retrained = load_teacher(TEST_MODEL, str(make_random_teacher(tmp_path / "retrained", seed=1)))
    other, _ = image_features(spec, list(range(6)), retrained, tmp_path / "cache", patch=False, device="cpu")
    assert not (other[0] == features[0]).all()  # a retrained teacher re-embeds the cached images
    assert FeatureStore(stores[0]).teacher == retrained.fingerprint.as_dict()


def invoke(trained, *args):
    world, teacher, plm, root = trained
    return CliRunner().invoke(main, ["evaluate", "--device", "cpu", "--student", str(root / "student"), "--plm",
                                     str(plm), *args])


def assert_one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_a_teacher_other_than_the_students_is_refused(trained, tmp_path):
    other = teacher_folder(make_random_teacher(tmp_path / "other", seed=1))
    assert_one_line_error(invoke(trained, "--teacher", str(other), "--output", str(tmp_path / "e")),
                          "but the student was distilled from")


def test_missing_inputs_give_one_clear_line(trained, tmp_path):
    assert_one_line_error(invoke(trained, "--student", str(tmp_path / "none"), "--output", str(tmp_path / "e")),
                          "does not exist")
    world = tmp_path / "world"
    shutil.copytree(trained[0], world)
    (world / "images" / "eval" / "000003.png").unlink()
    params = eval_params(trained, tmp_path / "e", benchmarks={"vqa": BenchmarkSpec(
        task="vqa", images=world / "images" / "eval", questions=world / "vqa" / "questions.json",
        annotations=world / "vqa" / "annotations.json", image_pattern=WORLD_IMAGE)})
    with pytest.raises(Exception, match="evaluation image\\(s\\) missing, e.g. .*000003.png"):
        run.evaluate(params)


def test_the_ladder_reads_each_images_description_and_captions_and_closes_the_gap_from_blank(trained, tmp_path,
                                                                                          monkeypatch):
    """The ladder's rungs: the language model before distillation reads "<evidence>. <vqa prompt>", where the
    evidence is the image's true description, or its reference captions (whole ones, the first always), and
    the answers are scored officially; each mode's gap closed is (image - blank) / (rung - blank)."""
    world = trained[0]
    params = eval_params(trained, tmp_path / "eval", vqa_modes=["direct", "describe"], num_beams=1)
    vqa = params.benchmarks["vqa"].model_copy(update={"captions": world / "captions" / "annotations.json",
                                                      "descriptions": world / "vqa" / "descriptions.json"})
    params = params.model_copy(update={"benchmarks": {"vqa": vqa}})
    read: list[str] = []
    text_only = answering.Generator._text_only

    def recording(self, prompts):
        read.extend(prompt for prompt in prompts if self.forced)  # a rung is read forced (a ceiling)
        return text_only(self, prompts)

    monkeypatch.setattr(answering.Generator, "_text_only", recording)
    metrics = run.evaluate(params)["vqa"]

    questions_file = json.loads((world / "vqa" / "questions.json").read_text())
    annotations = json.loads((world / "vqa" / "annotations.json").read_text())
    descriptions = {d["image_id"]: d["description"]
                    for d in json.loads((world / "vqa" / "descriptions.json").read_text())}
    captions: dict[int, list[str]] = {}
    for annotation in json.loads((world / "captions" / "annotations.json").read_text())["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    # The tiny language model reads at most its positions: the evidence is fitted to them (test_ladder.py).
    bart, tokenizer = load_language_model(params.plm, "test")
    prompts = {q["question_id"]: fill_prompt(params.vqa_prompt, question=q["question"])
               for q in questions_file["questions"]}
    prompt_tokens = max(len(tokenizer(prompt).input_ids) for prompt in prompts.values())
    length = reading_length(params.plm, tokenizer, bart) - params.vqa_max_new_tokens
    for q in questions_file["questions"]:
        for evidence in ([descriptions[q["image_id"]]], captions[q["image_id"]]):
            text, _ = fitted_evidence(evidence, tokenizer, prompt_tokens, length)
            assert text.split()[:2] == evidence[0].split()[:2]
            assert f"{text}. {prompts[q['question_id']]}" in read
    for rung in ("description", "captions"):
        written = json.loads((tmp_path / "eval" / "vqa" / "ladder" / f"predictions_{rung}.json").read_text())
        assert metrics["ladder"][rung]["overall"] == score_vqa(questions_file, annotations, written)["overall"]
        for mode, scores in metrics["modes"].items():
            blank, top = scores["controls"]["blank"]["overall"], metrics["ladder"][rung]["overall"]
            expected = round((scores["overall"] - blank) / (top - blank), 4) if top - blank > 1e-9 else None
            assert scores["gap_closed"][rung]["overall"] == expected, (mode, rung)
    assert set(metrics["gap_closed"]["description"]["perQuestionType"]) == set(metrics["perQuestionType"])
    assert all(metrics["ladder"][rung]["images_without_text"] == 0 and metrics["ladder"][rung]["images_shortened"] >= 0
               for rung in ("description", "captions"))
    assert "The ladder of ceilings" in (tmp_path / "eval" / "report.html").read_text()


def test_the_ladders_answers_are_read_once_and_again_when_what_they_read_changes(trained, tmp_path, monkeypatch):
    """A rung does not depend on the student: another evaluation reuses its answers from the cache, and a
    changed input (here one image's description) reads that rung again, and only that rung."""
    world = tmp_path / "world"
    shutil.copytree(trained[0], world, ignore=shutil.ignore_patterns("images"))
    params = eval_params(trained, tmp_path / "first", vqa_modes=["direct"], num_beams=1, cache=tmp_path / "cache")
    vqa = params.benchmarks["vqa"].model_copy(update={"captions": world / "captions" / "annotations.json",
                                                      "descriptions": world / "vqa" / "descriptions.json"})
    params = params.model_copy(update={"benchmarks": {"vqa": vqa}})
    asked: list[tuple[str, list[str]]] = []
    answers = answering.Generator.answers

    def recording(self, prompts, features, what):
        asked.append((what, prompts))
        return answers(self, prompts, features, what)

    monkeypatch.setattr(answering.Generator, "answers", recording)
    first = run.evaluate(params)["vqa"]
    assert {"vqa description", "vqa captions"} <= {what for what, _ in asked}
    asked.clear()
    second = run.evaluate(params.model_copy(update={"output": tmp_path / "second"}))["vqa"]
    assert asked and not {"vqa description", "vqa captions"} & {what for what, _ in asked}
    assert second["ladder"] == first["ladder"]
    descriptions = json.loads(vqa.descriptions.read_text())
    descriptions[0]["description"] = "nothing to see here"
    vqa.descriptions.write_text(json.dumps(descriptions))
    asked.clear()
    run.evaluate(params.model_copy(update={"output": tmp_path / "third"}))
    read = {what: prompts for what, prompts in asked}
    assert "vqa captions" not in read
    assert any(prompt.startswith("nothing to see here. ") for prompt in read["vqa description"])


def test_forced_decoding_rewrites_every_prompt_and_free_decoding_reports_how_often_it_did(trained, tmp_path):
    """`prompt_kept`: the share of direct-mode generations that wrote the prompt again before the answer
    (the rewrite fidelity the paper's inference relies on); forced decoding gives the decoder the prompt."""
    params = eval_params(trained, tmp_path / "free", vqa_modes=["direct"], num_beams=1)
    params = params.model_copy(update={"benchmarks": {"vqa": params.benchmarks["vqa"]}})
    free = run.evaluate(params)["vqa"]
    forced = run.evaluate(params.model_copy(update={"output": tmp_path / "forced", "decoding": "forced"}))["vqa"]
    assert free["modes"]["direct"]["prompt_kept"] == free["prompt_kept"]
    assert set(free["prompt_kept"]) == {"image", "text_only"} and 0 <= free["prompt_kept"]["image"] <= 1
    assert forced["prompt_kept"] == {"image": 1.0, "text_only": 1.0}


def test_an_aligned_teacher_student_is_evaluated_on_each_images_first_caption_text_features(trained, tmp_path,
                                                                                         monkeypatch):
    """The ladder's diagnostic rung: a student distilled with aligned_teacher gets, for each image, the teacher's
    normalised text embedding of its first reference caption, and of an empty caption for the blank control."""
    world, teacher_dir, plm, root = trained
    distill(DistillParams(features=root / "features", kept=None, plm=plm, output=tmp_path / "aligned",
                          checkpoints=tmp_path / "ckpt", plots=tmp_path / "curves", epochs=1, batch_size=6,
                          device="cpu", aligned_teacher=True))
    params = eval_params(trained, tmp_path / "eval", student=tmp_path / "aligned", vqa_modes=["direct"], num_beams=1)
    vqa = params.benchmarks["vqa"].model_copy(update={"captions": world / "captions" / "annotations.json"})
    calls = record_student_generation(monkeypatch)
    run.evaluate(params.model_copy(update={"benchmarks": {"vqa": vqa}}))

    teacher = load_teacher(*resolve_teacher(teacher_dir))
    first: dict[int, str] = {}
    for annotation in json.loads((world / "captions" / "annotations.json").read_text())["annotations"]:
        first.setdefault(annotation["image_id"], annotation["caption"])
    questions = json.loads((world / "vqa" / "questions.json").read_text())["questions"]
    with torch.no_grad():
        texts = [first[q["image_id"]] for q in questions] + [""]
        expected = torch.nn.functional.normalize(teacher.model.encode_text(teacher.tokenizer(texts)).float(), dim=-1)
    fed = torch.cat([call["features"] for call in calls])
    assert torch.allclose(fed[:len(questions)], expected[:-1], atol=1e-5)  # the image condition, question order
    assert any(torch.allclose(row, expected[-1], atol=1e-5) for row in fed[len(questions):])  # the blank control
    with pytest.raises(VlkdError, match="aligned_teacher.*captions"):
        run.evaluate(params.model_copy(update={"output": tmp_path / "other"}))
