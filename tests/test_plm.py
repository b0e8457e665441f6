"""The language-model stage at tiny size: tokenizer, text-infilling pretraining, the saved folder, a local
BART checkpoint, bad input through the CLI; and the prompt helpers the evaluate stage shares."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoTokenizer, BartForConditionalGeneration

from vlkd.cli import main
from vlkd.config import PlmParams, SynthParams
from vlkd.data import text
from vlkd.data.text import Noise, make_example, qa_pairs
from vlkd.errors import VlkdError
from vlkd.io import sha256_file
from vlkd.models import language_model
from vlkd.models.infill import extract_infill, fill_prompt
from vlkd.models.language_model import MANIFEST
from vlkd.plm import build as plm
from vlkd.plm import metrics as plm_metrics
from vlkd.plm import pretrain as plm_pretrain
from vlkd.plm.build import build_plm
from vlkd.plm.pretrain import pretrain, train_tokenizer
from vlkd.training import Checkpoint
from vlkd.world.synth import text_corpus

# The embedded model at test size: the same code path, a fraction of the compute.
TINY = {"model": None, "vocab_size": 400, "d_model": 32, "layers": 1, "heads": 2, "ffn_dim": 64, "max_length": 64,
        "max_positions": 96, "epochs": 12, "batch_size": 16, "lr": 3e-3, "warmup_steps": 10, "dropout": 0.0,
        "qa_questions": 12, "device": "cpu"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(train.txt, heldout.txt) of a small synthetic world: descriptions with questions, and captions."""
    root = tmp_path_factory.mktemp("text")
    train, heldout = text_corpus(SynthParams(text_scenes=200, seed=3))
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "heldout.txt").write_text("\n".join(heldout) + "\n")
    return root / "train.txt", root / "heldout.txt"


def tiny_params(corpus: tuple[Path, Path], output: Path, **overrides) -> PlmParams:
    return PlmParams(**{**TINY, "corpus": corpus[0], "heldout": corpus[1], "output": output,
                        "checkpoints": output.parent / "checkpoints", **overrides})


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> tuple[PlmParams, dict]:
    """(params, manifest) of one embedded model made by the stage."""
    params = tiny_params(corpus, tmp_path_factory.mktemp("stage") / "plm")
    return params, build_plm(params)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    documents = corpus[0].read_text().splitlines()
    return train_tokenizer(documents, 400, tmp_path_factory.mktemp("tokenizer"))


# ---------------------------------------------------------------------------------------------------
# Prompts and infills
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("prompt", "generated", "expected"), [
    # BART writes the prompt again with the mask filled in
    ("Question: What color is the circle? Answer: <mask>", "Question: What color is the circle? Answer: red", "red"),
    ("A picture of <mask>", "A picture of a red circle on the left", "a red circle on the left"),
    # case and whitespace differences
    ("Question: What color is the circle? Answer: <mask>", "question:  what color is the circle?answer:Red", "Red"),
    # a suffix after the mask
    ("<mask> is on the left.", "The red circle is on the left.", "The red circle"),
    ("Answer: <mask>. Done", "Answer: two circles. Done", "two circles"),
    ("Answer: <mask>.", "Answer: blue", "blue"),  # the suffix not reproduced
    # the prefix paraphrased: after the last occurrence of its final words
    ("Question: What color is the circle? Answer: <mask>", "Question: which colour has it? Answer: green", "green"),
    ("the scene. Question: Where is it? Answer: <mask>", "a scene, where is it? Answer: top", "top"),
    # nothing of the prefix: the whole generation, even where a word of the prefix occurs in it
    ("A picture of <mask>", "a red circle on the left", "a red circle on the left"),
    ("A picture of <mask>", "two shapes on a gray background, a red star to the left of a blue circle",
     "two shapes on a gray background, a red star to the left of a blue circle"),
    ("A picture of <mask>", "a picture of a star to the left of a circle", "a star to the left of a circle"),
    ("Answer: <mask>", "Answer:", ""),
    ("<mask>", "  anything at all ", "anything at all"),
])
def test_extract_infill(prompt, generated, expected):
    assert extract_infill(prompt, generated) == expected


def test_extract_infill_needs_one_mask():
    with pytest.raises(ValueError, match="exactly one"):
        extract_infill("no mask here", "text")


def test_fill_prompt():
    assert fill_prompt("Question: {question} Answer: <mask>", question="What  color\nis it?") == \
        "Question: What color is it? Answer: <mask>"
    assert fill_prompt("A picture of <mask>") == "A picture of <mask>"
    with pytest.raises(VlkdError, match="names field"):
        fill_prompt("Question: {question} Answer: <mask>", query="x")
    with pytest.raises(VlkdError, match="not exactly one"):
        fill_prompt("Question: {question}", question="x")
    with pytest.raises(VlkdError, match="not exactly one"):
        fill_prompt("<mask> and <mask>")


def test_qa_pairs_split_documents():
    description, pairs = qa_pairs("a small red circle on the left. Question: Where is the red circle? Answer: left "
                                  "Question: How many circles are there? Answer: 1")
    assert description == "a small red circle on the left"
    assert [(q, a) for q, a, _, _ in pairs] == [("Where is the red circle?", "left"),
                                                ("How many circles are there?", "1")]
    assert qa_pairs("a green triangle below a black circle") == ("a green triangle below a black circle", [])


# ---------------------------------------------------------------------------------------------------
# Tokenizer and training examples
# ---------------------------------------------------------------------------------------------------
def test_tokenizer_has_barts_special_ids_and_round_trips(tokenizer, corpus, tmp_path):
    assert [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == \
        [0, 1, 2, 3]
    assert tokenizer.mask_token_id == len(tokenizer) - 1
    for line in corpus[0].read_text().splitlines()[:20]:
        ids = tokenizer(line)["input_ids"]
        assert ids[0] == 0 and ids[-1] == 2
        assert tokenizer.decode(ids, skip_special_tokens=True) == line
    # <mask> swallows the space before it, as BART's does: the masked answer " red" is one <mask>
    ids = tokenizer("Answer: <mask>", add_special_tokens=False)["input_ids"]
    assert ids == tokenizer("Answer:", add_special_tokens=False)["input_ids"] + [tokenizer.mask_token_id]
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("Answer: <mask> left")["input_ids"] == tokenizer("Answer: <mask> left")["input_ids"]


def test_examples_mask_the_answers_or_random_spans(tokenizer):
    document = ("a small red circle on the left. Question: What color is the circle? Answer: red "
                "Question: Where is the red circle? Answer: left")
    [encoded] = text.encode_documents(tokenizer, [document], 64)
    assert [tokenizer.decode(encoded.tokens[start:end]).strip() for start, end in encoded.answers] == ["red", "left"]
    rng = np.random.default_rng(0)
    source, target, kind = make_example(encoded, tokenizer, Noise(0.3, 3.0, answer_mask_share=1.0), rng)
    assert kind == "answers"
    assert tokenizer.decode(source) == ("<s>a small red circle on the left. Question: What color is the circle? "
                                        "Answer:<mask> Question: Where is the red circle? Answer:<mask></s>")
    assert tokenizer.decode(target, skip_special_tokens=True) == document
    source, target, kind = make_example(encoded, tokenizer, Noise(0.3, 3.0, answer_mask_share=0.0), rng)
    assert kind == "spans" and tokenizer.mask_token_id in source
    assert tokenizer.decode(target, skip_special_tokens=True) == document
    # truncation drops the answers it cuts
    [short] = text.encode_documents(tokenizer, [document], 12)
    assert len(short.tokens) == 10 and short.answers == []


# ---------------------------------------------------------------------------------------------------
# The embedded model
# ---------------------------------------------------------------------------------------------------
def test_saved_folder_loads_with_from_pretrained(built):
    params, manifest = built
    output = Path(params.output)
    model = BartForConditionalGeneration.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.mask_token_id == manifest["mask_token_id"] == model.config.vocab_size - 1
    assert manifest["name"] == plm_pretrain.EMBEDDED_NAME and manifest["source"].startswith(plm.SOURCE_TRAINED)
    assert manifest["sha256"] == {name: sha256_file(output / name) for name in manifest["sha256"]}
    assert manifest["parameters"] == sum(p.numel() for p in model.parameters())
    assert json.loads((output / MANIFEST).read_text()) == manifest
    assert not (output.parent / ".plm.building").exists()
    # the saved model generates through BART's own generate
    batch = tokenizer(["Question: What color is the circle? Answer: <mask>"], return_tensors="pt")
    assert model.generate(**batch, num_beams=2, max_new_tokens=20).shape[0] == 1


def test_training_lowers_the_infilling_loss(built, corpus, tokenizer):
    params, manifest = built
    metrics = manifest["metrics"]
    training = metrics["training"]
    assert training["steps"] == params.epochs * -(-training["documents"] // params.batch_size)
    assert training["loss_last_epoch"] < 0.6 * training["loss_first_epoch"]
    assert training["answer_masked_examples"] > 0
    # held out: the trained model against an untrained one, on the same noise
    documents = corpus[1].read_text().splitlines()
    trained = BartForConditionalGeneration.from_pretrained(params.output)
    fresh = plm_pretrain.create_model(params, AutoTokenizer.from_pretrained(params.output))
    tokenizer = AutoTokenizer.from_pretrained(params.output)
    before = language_model.infilling_loss(fresh, tokenizer, documents, 0.3, 3.0, params.max_length)["loss"]
    after = language_model.infilling_loss(trained, tokenizer, documents, 0.3, 3.0, params.max_length)["loss"]
    assert after == pytest.approx(metrics["heldout_infilling"]["loss"], rel=1e-4)
    assert after < 0.6 * before
    qa = metrics["qa"]
    assert qa["questions"] == min(params.qa_questions, qa["available"])
    # The saved model asked again scores what the stage recorded (the scoring: test_text_qa_scores...).
    again = plm_metrics.text_qa(trained, tokenizer, documents, params.qa_questions, params.seed)
    for setting in ("with_description", "blind"):
        assert qa[setting] == again[setting], setting
        assert qa[setting]["examples"][0]["prompt"].endswith("Answer: <mask>")
    assert qa["blind"]["examples"][0]["prompt"].startswith("Question: ")
    assert not qa["with_description"]["examples"][0]["prompt"].startswith("Question: ")


def test_text_qa_scores_exact_match_with_and_without_the_description(monkeypatch):
    """A constructed case, the accuracies worked out by hand: the model answers every question but one
    right when it reads the description, and "Red." to every question asked blind."""
    documents = ["a red circle on the left. Question: What color is the circle? Answer: red "
                 "Question: Where is the circle? Answer: left",
                 "two blue squares. Question: How many squares are there? Answer: 2 "
                 "Question: What color are the squares? Answer: blue",
                 "a green triangle below a black circle"]  # a caption: no questions
    seen = {}
    informed = {"What color is the circle?": "Red", "Where is the circle?": "right",
                "How many squares are there?": " 2.", "What color are the squares?": "BLUE!"}

    def answering(model, tokenizer, prompts, device="cpu"):
        blind = all(prompt.startswith("Question: ") for prompt in prompts)
        seen["blind" if blind else "with_description"] = prompts
        questions = [prompt.split("Question: ")[1].split(" Answer:")[0] for prompt in prompts]
        return ["Red." if blind else informed[question] for question in questions]

    monkeypatch.setattr(plm_metrics, "generate_infills", answering)
    qa = plm_metrics.text_qa(None, None, documents, sample=10)
    assert (qa["questions"], qa["available"]) == (4, 4)
    assert seen["with_description"] == [
        "a red circle on the left. Question: What color is the circle? Answer: <mask>",
        "a red circle on the left. Question: Where is the circle? Answer: <mask>",
        "two blue squares. Question: How many squares are there? Answer: <mask>",
        "two blue squares. Question: What color are the squares? Answer: <mask>"]
    assert seen["blind"] == [prompt.split(". ", 1)[1] for prompt in seen["with_description"]]
    # With the description: 3 of 4 right (case and end punctuation ignored); "where is" is the miss.
    assert qa["with_description"]["accuracy"] == 0.75
    assert qa["with_description"]["per_question_type"] == {"how many": 1.0, "what color": 1.0, "where is": 0.0}
    # Blind, "Red." is right for the circle's color only.
    assert qa["blind"]["accuracy"] == 0.25
    assert qa["blind"]["per_question_type"] == {"how many": 0.0, "what color": 0.5, "where is": 0.0}
    assert qa["blind"]["examples"][1] == {"prompt": "Question: Where is the circle? Answer: <mask>",
                                          "answer": "left", "predicted": "Red."}


def test_same_seed_same_weights(corpus, tokenizer):
    documents = corpus[0].read_text().splitlines()[:64]
    params = tiny_params(corpus, Path("unused"), epochs=2)
    first, _ = pretrain(params, tokenizer, documents)
    second, _ = pretrain(params, tokenizer, documents)
    other, _ = pretrain(params.model_copy(update={"seed": 1}), tokenizer, documents)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.state_dict().values(), other.state_dict().values(),
                                                     strict=True))
    assert any(not torch.equal(a, c) for a, c in zip(first.state_dict().values(), other.state_dict().values(),
                                                      strict=True))


def test_up_to_date_folder_is_kept(built, monkeypatch):
    params, manifest = built
    monkeypatch.setattr(plm, "pretrain", lambda *args, **kwargs: pytest.fail("retrained an up-to-date model"))
    assert build_plm(params) == manifest


# ---------------------------------------------------------------------------------------------------
# A pretrained BART from a local directory (a hub name goes through the same from_pretrained)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_bart(tokenizer, tmp_path_factory) -> Path:
    """A tiny randomly initialised BART and its tokenizer, saved like a downloaded checkpoint."""
    folder = tmp_path_factory.mktemp("bart") / "tiny-bart"
    torch.manual_seed(0)
    plm_pretrain.create_model(PlmParams(**{**TINY, "output": folder}), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_bart_is_checked_and_saved(local_bart, corpus, tmp_path):
    params = tiny_params(corpus, tmp_path / "plm", model=str(local_bart), qa_questions=4)
    manifest = build_plm(params)
    assert manifest["name"] == str(local_bart) and manifest["source"] == language_model.SOURCE_LOCAL
    assert "training" not in manifest["metrics"] and "loss" in manifest["metrics"]["heldout_infilling"]
    original = BartForConditionalGeneration.from_pretrained(local_bart)
    saved = BartForConditionalGeneration.from_pretrained(tmp_path / "plm")
    for a, b in zip(original.state_dict().values(), saved.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert AutoTokenizer.from_pretrained(tmp_path / "plm").mask_token_id == manifest["mask_token_id"]


def test_not_a_bart_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(VlkdError, match="is a 'gpt2' model, not a BART"):
        language_model.load_pretrained(str(tmp_path / "gpt2"))


def test_unknown_hub_name_is_one_line(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(VlkdError, match="cannot load plm.model nobody-here/not-a-bart"):
        language_model.load_pretrained("nobody-here/not-a-bart")


# ---------------------------------------------------------------------------------------------------
# Bad input through the CLI: exit 2 and one line
# ---------------------------------------------------------------------------------------------------
def run_cli(tmp_path: Path, corpus: tuple[Path, Path], *flags: str, **overrides):
    settings = {**TINY, "corpus": str(corpus[0]), "heldout": str(corpus[1]), "output": str(tmp_path / "plm"),
                "epochs": 1, **overrides}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"plm": settings}))
    return CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), "plm", *flags])


def assert_one_line_error(result, *words: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlkd: error: "), result.stderr
    for word in words:
        assert word in lines[0]
    return lines[0]


def test_cli_missing_corpus(tmp_path, corpus):
    assert_one_line_error(run_cli(tmp_path, corpus, "--corpus", str(tmp_path / "nope.txt")), "nope.txt",
                          "does not exist")


def test_cli_empty_corpus(tmp_path, corpus):
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert_one_line_error(run_cli(tmp_path, corpus, "--corpus", str(tmp_path / "empty.txt")), "empty.txt",
                          "no text")


def test_cli_missing_local_model(tmp_path, corpus):
    assert_one_line_error(run_cli(tmp_path, corpus, "--model", str(tmp_path / "no-such-bart")), "no-such-bart",
                          "does not exist")


def test_cli_output_is_not_a_model_folder(tmp_path, corpus):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli(tmp_path, corpus, "--output", str(tmp_path / "taken")), "not a language model folder")
    (tmp_path / "file").write_text("a file")
    assert_one_line_error(run_cli(tmp_path, corpus, "--output", str(tmp_path / "file")), "refusing")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_cli_writes_metrics(tmp_path, corpus, local_bart):
    result = run_cli(tmp_path, corpus, "--model", str(local_bart), "--metrics", str(tmp_path / "m" / "plm.json"),
                     qa_questions=2)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m" / "plm.json").read_text())
    assert metrics == json.loads((tmp_path / "plm" / MANIFEST).read_text())["metrics"]
    assert "language model" in result.stdout


def test_a_killed_pretraining_resumes_to_the_same_weights(corpus, tokenizer, tmp_path, monkeypatch):
    """Killed in its second epoch, after the checkpoint of step 15 (13 steps an epoch): the resumed run takes
    the same batches and noise from there and ends with the same weights and the same loss record."""
    params = tiny_params(corpus, tmp_path / "plm", epochs=3, checkpoint_every=5)
    documents = corpus[0].read_text().splitlines()[:200]
    clean, clean_record = pretrain(params, tokenizer, documents, checkpoint=Checkpoint(tmp_path / "a" / "last.pt"))

    real_collate, batches = plm_pretrain.collate, []

    def die_at_batch_18(*args, **kwargs):
        batches.append(1)
        if len(batches) == 18:
            raise KeyboardInterrupt
        return real_collate(*args, **kwargs)

    checkpoint = Checkpoint(tmp_path / "b" / "last.pt")
    monkeypatch.setattr(plm_pretrain, "collate", die_at_batch_18)
    with pytest.raises(KeyboardInterrupt):
        pretrain(params, tokenizer, documents, checkpoint=checkpoint)
    assert torch.load(checkpoint.path, weights_only=True)["step"] == 15
    monkeypatch.setattr(plm_pretrain, "collate", real_collate)
    resumed, record = pretrain(params, tokenizer, documents, checkpoint=checkpoint)
    assert not checkpoint.path.exists()  # a finished run leaves no checkpoint
    for name, tensor in clean.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, atol=1e-6, rtol=1e-5)
    assert record["loss_per_epoch"] == pytest.approx(clean_record["loss_per_epoch"], rel=1e-5)
    assert record["answer_masked_examples"] == clean_record["answer_masked_examples"]
