"""The ladder of ceilings' arithmetic and the caption reader's fit (vlkd.evaluate.ladder), and forced decoding
(vlkd.models.infill): the pieces, without a trained model. The ladder end to end is in test_evaluate.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_plm
from transformers import AutoTokenizer, BartForConditionalGeneration

from vlkd.errors import VlkdError
from vlkd.evaluate.ladder import fitted_evidence, gap_closed, read_descriptions, reading_length
from vlkd.models.infill import extract_infill, forced_start, generate_infills


def test_gap_closed_is_the_share_of_the_way_from_the_blank_control_to_the_rung():
    score = {"overall": 50.0, "perQuestionType": {"what color": 80.0, "how many": 40.0}}
    blank = {"overall": 30.0, "perQuestionType": {"what color": 20.0, "how many": 40.0}}
    rung = {"overall": 70.0, "perQuestionType": {"what color": 100.0, "how many": 40.0}}
    assert gap_closed(score, blank, rung, per_question_type=True) == {
        "overall": 0.5, "perQuestionType": {"what color": 0.75, "how many": None}}  # no gap to close: None
    assert gap_closed(score, blank, rung, per_question_type=False) == {"overall": 0.5}


class WordTokenizer:
    """One token per word, and <s> </s> around them, as BART's tokenizer adds."""

    def __call__(self, text):
        return type("Encoded", (), {"input_ids": [0, *range(len(text.split())), 2]})()


def test_captions_are_joined_whole_up_to_the_length_the_language_model_was_trained_on():
    captions = ["one two three.", "four five", "six seven eight nine"]
    # a prompt of 2 words (4 tokens with <s> </s>): the context "one two three. four five. w w" is 9 tokens with
    # <s> </s>, and the third caption would make it 13
    assert fitted_evidence(captions, WordTokenizer(), prompt_tokens=4, length=9) == ("one two three. four five", True)
    assert fitted_evidence(captions, WordTokenizer(), 4, 100) == ("one two three. four five. six seven eight nine",
                                                                  False)
    # a first segment too long alone is cut to its first words that fit
    assert fitted_evidence(["a b c d e f g h i j"], WordTokenizer(), 4, 9) == ("a b c d e", True)


def test_the_reading_length_is_what_the_language_model_was_trained_on(tmp_path):
    (tmp_path / "vlkd-plm.json").write_text(json.dumps({"params": {"max_length": 48}}))
    config = type("Config", (), {"max_position_embeddings": 96})
    model = type("Model", (), {"config": config})
    assert reading_length(tmp_path, WordTokenizer(), model) == 48
    pretrained = type("Tokenizer", (), {"model_max_length": 1024})()
    assert reading_length(tmp_path / "elsewhere", pretrained, model) == 1024
    assert reading_length(tmp_path / "elsewhere", WordTokenizer(), model) == 96


def test_descriptions_in_another_format_are_one_clear_error(tmp_path):
    path = tmp_path / "descriptions.json"
    path.write_text(json.dumps({"0": "a red circle"}))
    with pytest.raises(VlkdError, match="image_id.*description"):
        read_descriptions(path)
    path.write_text(json.dumps([{"image_id": 0, "description": "a  red\ncircle"}]))
    assert read_descriptions(path) == {0: "a red circle"}


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory):
    words = ["Question: What color is the circle? Answer: red", "Question: How many? Answer: 2", "there is a circle"]
    folder = make_tiny_plm(tmp_path_factory.mktemp("bart") / "plm", words * 20)
    return BartForConditionalGeneration.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_forced_decoding_starts_each_rewrite_with_its_own_prompt_and_writes_only_the_answer(tiny_bart, monkeypatch):
    bart, tokenizer = tiny_bart
    prompts = ["Question: What color is the big circle? Answer: <mask>", "Question: How many? Answer: <mask>",
               "there is <mask>", "Question: How many circles? Answer: <mask>"]
    starts, generate = [], bart.generate

    def recording(**kwargs):
        starts.append(kwargs["decoder_input_ids"].tolist())
        return generate(**kwargs)

    monkeypatch.setattr(bart, "generate", recording)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    texts = generate_infills(bart, tokenizer, dict(encoded), prompts, num_beams=2, max_new_tokens=3, forced=True)
    # Each call's rows start alike ([</s> <s> prompt before its mask]): BART's positions are absolute.
    assert all(len({len(row) for row in call}) == 1 for call in starts)
    expected = [[bart.config.decoder_start_token_id] + tokenizer(forced_start(p)).input_ids[:-1] for p in prompts]
    assert sorted(row for call in starts for row in call) == sorted(expected)
    for prompt, text in zip(prompts, texts, strict=True):  # each text is its own prompt's, in the given order
        assert text.startswith(forced_start(prompt))
        assert len(tokenizer(extract_infill(prompt, text), add_special_tokens=False).input_ids) <= 3 + 1


def test_free_decoding_is_unchanged_by_the_forced_option(tiny_bart):
    bart, tokenizer = tiny_bart
    prompts = ["Question: How many? Answer: <mask>", "there is <mask>"]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    budget = encoded.input_ids.shape[1] + 4
    direct = tokenizer.batch_decode(bart.generate(**encoded, num_beams=2, early_stopping=True, max_new_tokens=budget),
                                    skip_special_tokens=True)
    assert generate_infills(bart, tokenizer, dict(encoded), prompts, 2, 4, forced=False) == direct
