"""CLIP-TD (vlkd vlm, vlkd finetune): selection, weights and the loss on hand-made inputs; the world's task
files; the protocol end to end on a tiny world with a tiny ViLT and a random teacher; what a saved model
is; resuming; the bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TEST_MODEL, make_random_teacher
from PIL import Image

from vlkd.cli import main
from vlkd.config import FinetuneParams, TaskSpec, VlmParams
from vlkd.errors import VlkdError
from vlkd.finetune import run as protocol
from vlkd.finetune import train
from vlkd.finetune.clip_td import distillation_loss, relevance, token_distance, top_k, ve_confidence, vqa_confidence
from vlkd.finetune.tasks import Example, read_split
from vlkd.models.teacher import MANIFEST, SOURCE_FILE
from vlkd.models.vilt import pixel_values
from vlkd.training import Optimization
from vlkd.vlm.build import build_vlm

PATTERN = "{image_id:06d}.png"


# -- selection, weight and loss on inputs with known answers -------------------------------------------
def test_top_k_takes_the_most_relevant_valid_tokens_and_never_padding():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.99], [0.3, 0.2, 0.1, 0.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])  # padding is invalid
    assert top_k(scores, valid, 2).tolist() == [[False, True, True, False], [True, True, False, False]]
    assert top_k(scores, valid, 3).tolist() == [[True, True, True, False], [True, True, False, False]]


def test_relevance_is_the_cosine_with_the_other_modality():
    targets = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    other = torch.tensor([[3.0, 0.0]])
    assert torch.allclose(relevance(targets, other), torch.tensor([[1.0, 0.0, math.sqrt(0.5)]]))


def test_ve_weight_is_the_teachers_confidence_in_the_gold_label():
    examples = [Example(str(i), Path("x.png"), "h", label, group="p") for i, label in
                enumerate(("entailment", "neutral", "contradiction"))]
    similarity = torch.tensor([0.3, 0.2, 0.1])
    weights = ve_confidence(examples, similarity, temperature=0.1)
    best, worst = torch.softmax(similarity / 0.1, 0), torch.softmax(-similarity / 0.1, 0)
    assert torch.allclose(weights, torch.stack([best[0], 1 - best[1] - worst[1], worst[2]]))
    assert weights[0] > 1 / 3 and weights[2] > 1 / 3  # the teacher ranks the three as their labels say


class _Texts(list):
    """What the word teacher's tokenizer returns: the texts, on any device."""

    def to(self, device):
        return self


class _WordTeacher:
    """A text tower with known embeddings: a text is the sum of its words' unit vectors."""

    axes = {"red": [1.0, 0.0], "blue": [0.0, 1.0], "what": [0.0, 0.0], "colour": [0.0, 0.0]}

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[sum(self.axes[w][d] for w in text.split()) for d in range(2)] for text in texts])


def test_vqa_weight_is_the_softmax_over_the_answers_at_the_gold_one():
    examples = [Example(str(i), Path("x.png"), "what colour", label) for i, label in
                enumerate(("red", "blue", "red", "green"))]  # green: outside the answer vocabulary
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    kwargs = {"labels": ["red", "blue"], "image": image, "temperature": 0.5, "device": torch.device("cpu")}
    teacher, tokenizer = _WordTeacher(), _Texts
    per_question = vqa_confidence(teacher, tokenizer, examples, candidate="{question} {answer}", batch_size=3, **kwargs)
    fixed = vqa_confidence(teacher, tokenizer, examples, candidate="{answer}", batch_size=3, **kwargs)
    agree, disagree = torch.softmax(torch.tensor([2.0, 0.0]), 0).tolist()  # cos 1 and 0, over T = 0.5
    assert per_question.tolist() == pytest.approx([agree, disagree, disagree, 0.0])
    assert fixed.tolist() == pytest.approx(per_question.tolist())


def test_distillation_loss_value():
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    distance = token_distance(student, target, "l1")
    assert distance.tolist() == [[0.0, 2.0], [2.0, 0.0]]
    mask = torch.tensor([[True, True], [True, False]])
    weights = torch.tensor([0.5, 1.0])
    # instance 1: w 0.5 x mean(0, 2) = 0.5; instance 2: w 1 x mean(2) = 2; batch mean 1.25
    assert distillation_loss([distance], [mask], weights).item() == pytest.approx(1.25)


def test_subsets_are_nested_deterministic_and_the_same_for_every_call():
    ids = [str(i) for i in range(200)]
    first = protocol.fixed_subsets(ids, [0.01, 0.05, 1.0])
    assert first == protocol.fixed_subsets(list(reversed(ids)), [1.0, 0.05, 0.01])
    assert [len(first[f]) for f in (0.01, 0.05, 1.0)] == [2, 10, 200]
    assert set(first[0.01]) <= set(first[0.05]) <= set(first[1.0])


def test_schedule_is_seeded_and_covers_each_pass():
    batches = train.schedule(10, 4, 5, torch.Generator().manual_seed(0))
    assert batches == train.schedule(10, 4, 5, torch.Generator().manual_seed(0))
    assert len(batches) == 5 and len(set(batches[0] + batches[1])) == 8  # a pass never repeats an example


# -- the protocol on a tiny world ----------------------------------------------------------------------------
def _tasks(world: Path) -> dict[str, TaskSpec]:
    tasks = world / "tasks"

    def split(name: str, **files) -> dict:
        return {"images": tasks / "images" / name, "image_pattern": PATTERN, **files}

    vqa = {name: split(name, questions=tasks / f"vqa/{name}/questions.json",
                       annotations=tasks / f"vqa/{name}/annotations.json") for name in ("train", "test", "shifted")}
    return {"vqa": TaskSpec(task="vqa", **vqa),
            "ve": TaskSpec(task="ve", train=split("train", file=tasks / "ve/snli_ve_train.jsonl"),
                           test=split("test", file=tasks / "ve/snli_ve_test.jsonl"))}


@pytest.fixture(scope="module")
def setup(tiny_world_shards, tmp_path_factory):
    world, shards = tiny_world_shards
    root = tmp_path_factory.mktemp("finetune")
    checkpoint = make_random_teacher(root / "teacher")
    (root / "teacher" / MANIFEST).write_text(json.dumps({"model": TEST_MODEL, "pretrained": checkpoint.name,
                                                         "source": SOURCE_FILE}))
    build_vlm(VlmParams(output=root / "vlm", model=None, shards=shards, vocab_size=200, image_size=32, patch_size=8,
                        hidden=32, layers=1, heads=2, ffn_dim=64, epochs=1, batch_size=8, device="cpu"))
    params = FinetuneParams(vlm=root / "vlm", teacher=root / "teacher", output=root / "out", cache=root / "cache",
                            checkpoints=root / "checkpoints", data=world, tasks=_tasks(world), fractions=[0.5, 1.0],
                            seeds=[0, 1], variants=["none", "clip-td"], ablations=["select-only"],
                            ablation_fractions=[0.5], epochs=1, min_steps=3, batch_size=8, device="cpu")
    return params, protocol.finetune(params)


def test_the_world_has_both_tasks_in_their_published_formats(tiny_world_shards):
    world, _ = tiny_world_shards
    rows = [json.loads(line) for line in (world / "tasks/ve/snli_ve_train.jsonl").read_text().splitlines()]
    assert {"Flickr30K_ID", "sentence1", "sentence2", "gold_label"} <= set(rows[0])
    assert {row["gold_label"] for row in rows} == {"entailment", "neutral", "contradiction"}
    vqa = read_split("vqa", _tasks(world)["vqa"].train, "train")
    assert vqa.examples and all(example.image.is_file() for example in vqa.examples)
    for split, source in (("train", "train"), ("test", "eval"), ("shifted", "shifted")):  # the tasks' own copies
        for copy in (world / "tasks/images" / split).iterdir():
            assert copy.read_bytes() == (world / "images" / source / copy.name).read_bytes()
    assert (world / "tasks/vqa/test/questions.json").read_bytes() == (world / "vqa/questions.json").read_bytes()


def test_protocol_reports_every_variant_fraction_and_split(setup):
    params, metrics = setup
    assert set(metrics) == {"vqa", "ve"}
    assert set(metrics["vqa"]["test"]) == {"none", "clip-td", "select-only"}
    assert set(metrics["vqa"]["shifted"]["clip-td"]) == {"0.5", "1.0"}
    assert set(metrics["vqa"]["shifted"]["select-only"]) == {"0.5"}
    cell = metrics["ve"]["test"]["clip-td"]["1.0"]
    assert len(cell["seeds"]) == 2 and "gain_mean" in cell
    gains = [s - n for s, n in zip(cell["seeds"], metrics["ve"]["test"]["none"]["1.0"]["seeds"], strict=True)]
    assert cell["gain_mean"] == pytest.approx(sum(gains) / 2, abs=0.01)
    saved = json.loads((params.output / "subsets" / "vqa.json").read_text())
    assert saved == {str(f): ids for f, ids in protocol.fixed_subsets(
        [e.id for e in read_split("vqa", params.tasks["vqa"].train, "t").examples], [0.5, 1.0]).items()}
    assert "<svg" in (params.output / "report.html").read_text()


def test_a_clip_td_model_is_the_same_model_as_one_fine_tuned_without_it(setup):
    from safetensors.torch import load_file
    from transformers import ViltForQuestionAnswering

    params, _ = setup
    plain, distilled = (load_file(params.output / "vqa" / v / "model.safetensors") for v in ("none", "clip-td"))
    assert {k: v.shape for k, v in plain.items()} == {k: v.shape for k, v in distilled.items()}
    assert not any(key.startswith(("heads.", "text.", "image.")) for key in distilled)  # no projection head
    config = json.loads((params.output / "vqa" / "clip-td" / "config.json").read_text())
    assert config["architectures"] == ["ViltForQuestionAnswering"]
    assert isinstance(ViltForQuestionAnswering.from_pretrained(params.output / "vqa" / "clip-td"),
                      ViltForQuestionAnswering)
    assert not torch.equal(plain["classifier.3.weight"], distilled["classifier.3.weight"])  # trained otherwise


class _TeacherTripwire:
    """In the place of a task's teacher targets: reading any of them fails the test."""

    def __getattr__(self, name: str):
        pytest.fail(f"evaluation read the teacher's targets ({name})")


def test_evaluation_never_reads_the_teacher(setup):
    """A fine-tuned model is scored from itself and the test splits alone: its task data is built here without
    the teacher, with a tripwire where the teacher's targets go, and each score is still the one the protocol
    recorded for this model while the teacher and its targets were at hand."""
    params, metrics = setup
    for name, spec in params.tasks.items():
        folder = params.output / name / "clip-td"  # the saved model: save_fraction, the first seed
        processor = protocol.load_processor(folder)
        config = json.loads((folder / "config.json").read_text())
        labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        tests = {split: read_split(spec.task, getattr(spec, split), split) for split in ("test", "shifted")
                 if getattr(spec, split) is not None}
        images = sorted({e.image for split in tests.values() for e in split.examples})
        pixels = dict(zip(images, pixel_values(processor, [Image.open(path) for path in images]), strict=True))
        task = train.TaskData(name, spec.task, labels, read_split(spec.task, spec.train, "train"), tests, pixels,
                              _TeacherTripwire(), processor.tokenizer, processor.tokenizer.model_max_length)
        model = train.task_model(folder, labels, 0).eval()
        for split, examples in tests.items():
            score = train.evaluate(model, train.PatchOrder(model.vilt), task, examples, 16, torch.device("cpu"))
            assert score["score"] == metrics[name][split]["clip-td"][str(params.save_fraction)]["seeds"][0], \
                (name, split)


def test_a_killed_run_resumes_at_its_checkpoint_and_ends_the_same(setup, tmp_path, monkeypatch):
    params, _ = setup
    params = params.model_copy(update={"checkpoint_every": 2, "min_steps": 5})
    teacher = protocol.load_teacher(*protocol.resolve_teacher(params.teacher), image_tokens=True)
    task = protocol._load_task("ve", params.tasks["ve"], params, teacher, protocol.load_processor(params.vlm),
                               torch.device("cpu"), False, protocol.stage_record(params))
    ids = [e.id for e in task.train.examples]
    whole, _ = train.run(params, task, params.vlm, ids, 0, "clip-td", torch.device("cpu"), tmp_path / "a.pt")
    real_loss, calls = train._task_loss, []

    def dies_at_step_4(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(train, "_task_loss", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.run(params, task, params.vlm, ids, 0, "clip-td", torch.device("cpu"), tmp_path / "b.pt")
    assert (tmp_path / "b.pt").is_file()
    monkeypatch.setattr(train, "_task_loss", real_loss)
    resumed, _ = train.run(params, task, params.vlm, ids, 0, "clip-td", torch.device("cpu"), tmp_path / "b.pt")
    assert not (tmp_path / "b.pt").exists()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_fine_tuning_lowers_the_task_loss(setup):
    params, _ = setup
    params = params.model_copy(update={"min_steps": 20, "lr": 1e-3})
    teacher = protocol.load_teacher(*protocol.resolve_teacher(params.teacher), image_tokens=True)
    task = protocol._load_task("ve", params.tasks["ve"], params, teacher, protocol.load_processor(params.vlm),
                               torch.device("cpu"), False, protocol.stage_record(params))
    ids = [e.id for e in task.train.examples][:8]
    _, result = train.run(params, task, params.vlm, ids, 0, "clip-td", torch.device("cpu"), params.checkpoints / "x.pt")
    first = train.run(params.model_copy(update={"min_steps": 1, "lr": 1e-9}), task, params.vlm, ids, 0, "clip-td",
                      torch.device("cpu"), params.checkpoints / "y.pt")[1]
    assert result["losses"]["task"] < first["losses"]["task"]


def test_the_classifier_learns_at_its_multiple_of_the_learning_rate(setup, monkeypatch):
    """ViLT's recipe: the classifier, new at every run, at head_lr_multiplier x lr; the pretrained body and the
    projection heads at lr."""
    params, _ = setup
    built = []

    def recording(*args, **kwargs):
        built.append(Optimization(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train, "Optimization", recording)
    teacher = protocol.load_teacher(*protocol.resolve_teacher(params.teacher), image_tokens=True)
    task = protocol._load_task("ve", params.tasks["ve"], params, teacher, protocol.load_processor(params.vlm),
                               torch.device("cpu"), False, protocol.stage_record(params))
    model, _ = train.run(params.model_copy(update={"min_steps": 1, "epochs": 1}), task, params.vlm,
                         [e.id for e in task.train.examples][:4], 0, "clip-td", torch.device("cpu"),
                         params.checkpoints / "lr.pt")
    classifier = {id(p) for p in model.classifier.parameters()}
    groups = built[0].optimizer.param_groups
    assert classifier <= {id(p) for g in groups for p in g["params"]}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        assert not ids & classifier or ids <= classifier  # a group is all classifier or none of it
        factor = params.head_lr_multiplier if ids & classifier else 1.0
        assert group["initial_lr"] == pytest.approx(params.lr * factor)
    assert params.head_lr_multiplier == 10


# -- bad inputs: one line each ---------------------------------------------------------------------------
def test_targets_of_another_teacher_stop_with_one_line(setup, tmp_path):
    params, _ = setup
    other = make_random_teacher(tmp_path / "other", seed=1)
    (tmp_path / "other" / MANIFEST).write_text(json.dumps({"model": TEST_MODEL, "pretrained": other.name,
                                                           "source": SOURCE_FILE}))
    with pytest.raises(VlkdError, match="made by teacher .* not by finetune.teacher .*--replace-other-teachers"):
        protocol.finetune(params.model_copy(update={"teacher": tmp_path / "other", "output": tmp_path / "out"}))


def test_a_task_file_in_the_wrong_format_is_one_line(tiny_world_shards, tmp_path):
    world, _ = tiny_world_shards
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": 1, "text": "a red circle"}\n')
    spec = _tasks(world)["ve"].train.model_copy(update={"file": bad})
    with pytest.raises(VlkdError, match="lacks Flickr30K_ID, sentence2 or gold_label; expected SNLI-VE jsonl"):
        read_split("ve", spec, "finetune.tasks.ve.train")
    questions = _tasks(world)["vqa"].train.model_copy(update={"annotations": world / "tasks/ve/snli_ve_train.jsonl"})
    with pytest.raises(VlkdError, match="is not valid JSON"):
        read_split("vqa", questions, "finetune.tasks.vqa.train")


def test_a_row_without_a_consensus_label_is_counted_and_skipped(tiny_world_shards, tmp_path):
    world, _ = tiny_world_shards
    rows = (world / "tasks/ve/snli_ve_train.jsonl").read_text().splitlines()
    no_consensus = json.loads(rows[0]) | {"gold_label": "-"}
    (tmp_path / "ve.jsonl").write_text("\n".join([json.dumps(no_consensus), *rows[1:]]) + "\n")
    split = read_split("ve", _tasks(world)["ve"].train.model_copy(update={"file": tmp_path / "ve.jsonl"}), "t")
    assert split.skipped == {"gold_label '-'": 1} and len(split.examples) == len(rows) - 1


def test_a_fraction_outside_zero_to_one_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["finetune", "--fraction", "1.5"])
    assert result.exit_code == 2
    assert "a training fraction must lie in (0, 1], not 1.5" in result.output
    assert len(result.output.strip().splitlines()) == 1
