"""The noise in the human answers: ten answers per question, as VQA's annotators gave them, mostly the
canonical answer and sometimes another format, a synonym, a wrong answer or a typo."""

from __future__ import annotations

import random

from vlkd.world.language import Question, unique, with_article
from vlkd.world.scenes import COLOURS, POSITIONS, SHAPES

ANSWERS_PER_QUESTION = 10

_ANSWER_VOCABULARY = {
    "colour": COLOURS,
    "shape": SHAPES,
    "count": ("0", "1", "2"),
    "exists": ("yes", "no"),
    "position": POSITIONS,
}

# Human answers: how often all 10 agree, how many differ otherwise, and what kind of difference.
_ALL_IDENTICAL = 0.4
_NOISY_COUNTS, _NOISY_WEIGHTS = (1, 2, 3, 4), (4, 3, 2, 1)
_MAX_WRONG = 3
_NOISE_KINDS, _NOISE_WEIGHTS = ("format", "synonym", "wrong", "typo"), (4, 2, 3, 1)
_NUMBER_WORDS = {"0": ("zero", "none"), "1": ("one",), "2": ("two",), "3": ("three",)}
_SYNONYMS = {  # answers a person might give that the official normalisation does NOT map back
    "middle": ("center", "centre"),
    "purple": ("violet",),
    "circle": ("round", "oval"),
    "square": ("box", "rectangle"),
    "diamond": ("rhombus",),
    "top": ("up", "upper"),
    "bottom": ("down", "lower"),
    "left": ("left side",),
    "right": ("right side",),
    "gray": ("grey",),
}


def human_answers(question: Question, rng: random.Random) -> list[tuple[str, str]]:
    """Ten (answer, answer_confidence) pairs: 40% of questions all canonical, the others with 1-4
    answers that differ (formatting the official normalisation may undo, synonyms it does not, at most
    three wrong answers, typos). The canonical answer always has the majority."""
    if rng.random() < _ALL_IDENTICAL:
        return [(question.answer, _confidence(rng, noisy=False)) for _ in range(ANSWERS_PER_QUESTION)]
    noisy_count = rng.choices(_NOISY_COUNTS, weights=_NOISY_WEIGHTS)[0]
    noisy_slots = rng.sample(range(ANSWERS_PER_QUESTION), noisy_count)
    answers, wrong = [], 0
    for slot in range(ANSWERS_PER_QUESTION):
        if slot not in noisy_slots:
            answers.append((question.answer, _confidence(rng, noisy=False)))
            continue
        kind = rng.choices(_NOISE_KINDS, weights=_NOISE_WEIGHTS)[0]
        if kind == "wrong" and wrong >= _MAX_WRONG:
            kind = "format"
        wrong += kind == "wrong"
        answers.append((_noisy_answer(question, kind, rng), _confidence(rng, noisy=True)))
    return answers


def _noisy_answer(question: Question, kind: str, rng: random.Random) -> str:
    options = {
        "format": _format_variants,
        "synonym": _synonyms,
        "wrong": _wrong_answers,
        "typo": _typos,
    }[kind](question)
    return rng.choice(options or _format_variants(question))


def _format_variants(question: Question) -> list[str]:
    """Variants the official normalisation can map back: case, a final period, number words,
    articles."""
    answer = question.answer
    variants = [answer.capitalize(), answer + ".", *_NUMBER_WORDS.get(answer, ())]
    if question.kind in ("shape", "position"):
        variants += (
            [f"the {answer}", with_article(answer)] if question.kind == "shape" else [f"the {answer}"]
        )
    return [variant for variant in variants if variant != answer]


def _synonyms(question: Question) -> list[str]:
    return list(_SYNONYMS.get(question.answer, ()))


def _wrong_answers(question: Question) -> list[str]:
    return [answer for answer in _ANSWER_VOCABULARY[question.kind] if answer != question.answer]


def _typos(question: Question) -> list[str]:
    """The answer with two neighbouring letters swapped ("red" -> "rde")."""
    word = question.answer
    swapped = [word[:i] + word[i + 1] + word[i] + word[i + 2 :] for i in range(1, len(word) - 1)]
    return [typo for typo in unique(swapped) if typo != word] if len(word) >= 3 else []


def _confidence(rng: random.Random, noisy: bool) -> str:
    weights = (4, 5, 1) if noisy else (17, 3, 0)
    return rng.choices(("yes", "maybe", "no"), weights=weights)[0]
