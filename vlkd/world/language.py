"""The world in words: captions, full descriptions, questions with their canonical answers, and the
language model's text corpus."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from vlkd.config import SynthParams
from vlkd.world.scenes import COLOURS, GRID, SHAPES, Scene, SceneObject, sample_scenes, scene_stream, stream

logger = logging.getLogger(__name__)

_BACKGROUND_PHRASES = {
    "gray": "a gray background",
    "beige": "a beige background",
    "sky": "a light blue background",
    "navy": "a navy background",
    "checkered": "a checkered background",
    "noise": "a noisy background",
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}

# ---------------------------------------------------------------------------------------------------
# Captions and questions
# ---------------------------------------------------------------------------------------------------
# Fields: a/b = "a red circle", sa/sb = "a small red circle", pa/pb = "on the left", bg = "a gray
# background", rel = where a is relative to b. Every template names every object's colour and shape.
SINGLE_TEMPLATES = (
    "{a} {pa}",
    "{sa} on {bg}",
    "there is {sa} {pa}",
    "{sa} {pa} of {bg}",
    "{a} on {bg}",
    "{bg} with {a} {pa}",
    "a single shape: {sa}",
    "just {a} {pa}",
)
PAIR_TEMPLATES = (
    "{a} and {b}",
    "{a} {rel} {b}",
    "there is {sa} {pa} and {sb} {pb}",
    "two shapes: {a} and {b}",
    "{sa} and {sb} on {bg}",
    "{a} {pa} and {b} {pb}",
    "{bg} with {a} and {b}",
    "two shapes on {bg}, {sa} {rel} {sb}",
)
# Full descriptions for the text corpus: they state everything a question can ask about.
SINGLE_DESCRIPTIONS = ("{sa} {pa}", "there is {sa} {pa}", "{sa} {pa} of {bg}")
PAIR_DESCRIPTIONS = (
    "{sa} {pa} and {sb} {pb}",
    "there is {sa} {pa} and {sb} {pb}",
    "{bg} with {sa} {pa} and {sb} {pb}",
)

QUESTION_KINDS = {  # kind: (question_type, answer_type) as in the VQA annotation files
    "colour": ("what color is the", "other"),
    "shape": ("what shape is the", "other"),
    "count": ("how many", "number"),
    "exists": ("is there a", "yes/no"),
    "position": ("where is the", "other"),
}


@dataclass(frozen=True)
class Question:
    kind: str  # a key of QUESTION_KINDS
    text: str
    answer: str  # the canonical answer


# ---------------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------------
def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where `a` is relative to `b` (vertical wins when both differ)."""
    (ax, ay), (bx, by) = GRID[a.position], GRID[b.position]
    if ay != by:
        return "above" if ay < by else "below"
    return "to the left of" if ax < bx else "to the right of"


def _phrases(scene: Scene, rng: random.Random) -> dict[str, str]:
    """Template fields for the scene, its objects mentioned in a random order."""
    objects = list(scene.objects)
    rng.shuffle(objects)
    fields = {"bg": _BACKGROUND_PHRASES[scene.background]}
    for key, obj in zip("ab", objects, strict=False):
        fields[key] = with_article(f"{obj.colour} {obj.shape}")
        fields["s" + key] = with_article(f"{obj.size} {obj.colour} {obj.shape}")
        fields["p" + key] = POSITION_PHRASES[obj.position]
    if len(objects) == 2:
        fields["rel"] = _relation(objects[0], objects[1])
    return fields


def caption_scene(scene: Scene, rng: random.Random, count: int) -> list[str]:
    """`count` captions from different templates (templates repeat only past their number)."""
    templates = SINGLE_TEMPLATES if len(scene.objects) == 1 else PAIR_TEMPLATES
    picks: list[str] = []
    while len(picks) < count:
        picks += rng.sample(templates, min(count - len(picks), len(templates)))
    return [template.format(**_phrases(scene, rng)) for template in picks]


def describe_scene(scene: Scene, rng: random.Random) -> str:
    """A description stating colour, shape, size and position of every object."""
    templates = SINGLE_DESCRIPTIONS if len(scene.objects) == 1 else PAIR_DESCRIPTIONS
    return rng.choice(templates).format(**_phrases(scene, rng))


# ---------------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------------
def unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _colour_questions(scene: Scene, rng: random.Random) -> list[Question]:
    shapes = [obj.shape for obj in scene.objects]
    return [
        Question("colour", f"What color is the {obj.shape}?", obj.colour)
        for obj in scene.objects
        if shapes.count(obj.shape) == 1
    ]


def _shape_questions(scene: Scene, rng: random.Random) -> list[Question]:
    colours = [obj.colour for obj in scene.objects]
    return [
        Question("shape", f"What shape is the {obj.colour} object?", obj.shape)
        for obj in scene.objects
        if colours.count(obj.colour) == 1
    ]


def _count_questions(scene: Scene, rng: random.Random) -> list[Question]:
    colours = [obj.colour for obj in scene.objects]
    shapes = [obj.shape for obj in scene.objects]
    absent_colour = rng.choice([c for c in COLOURS if c not in colours])
    absent_shape = rng.choice([s for s in SHAPES if s not in shapes])
    questions = [Question("count", "How many shapes are there?", str(len(scene.objects)))]
    questions += [
        Question("count", f"How many {c} shapes are there?", str(colours.count(c)))
        for c in unique([*colours, absent_colour])
    ]
    questions += [
        Question("count", f"How many {s}s are there?", str(shapes.count(s)))
        for s in unique([*shapes, absent_shape])
    ]
    return questions


def _exists_questions(scene: Scene, rng: random.Random) -> list[Question]:
    """One question answered yes and one answered no; the absent object shares a colour or a shape
    with an object in the scene, so the question is plausible."""
    present = [obj.pair for obj in scene.objects]
    shown = rng.choice(scene.objects)
    base = rng.choice(scene.objects)
    near = [(c, base.shape) for c in COLOURS] + [(base.colour, s) for s in SHAPES]
    absent = rng.choice([pair for pair in near if pair not in present])
    return [
        Question("exists", f"Is there {with_article(f'{shown.colour} {shown.shape}')}?", "yes"),
        Question("exists", f"Is there {with_article(f'{absent[0]} {absent[1]}')}?", "no"),
    ]


def _position_questions(scene: Scene, rng: random.Random) -> list[Question]:
    return [
        Question("position", f"Where is the {obj.colour} {obj.shape}?", obj.position) for obj in scene.objects
    ]


_QUESTION_MAKERS = {
    "colour": _colour_questions,
    "shape": _shape_questions,
    "count": _count_questions,
    "exists": _exists_questions,
    "position": _position_questions,
}


def ask_questions(scene: Scene, rng: random.Random, count: int,
                  kinds: Sequence[str] = tuple(QUESTION_KINDS)) -> list[Question]:
    """Up to `count` different questions about the scene, taking the `kinds` in turn (random order)."""
    pools = {kind: make(scene, rng) for kind, make in _QUESTION_MAKERS.items() if kind in kinds}
    kinds = list(pools)
    rng.shuffle(kinds)
    questions: list[Question] = []
    while len(questions) < count and any(pools.values()):
        for kind in kinds:
            if pools[kind] and len(questions) < count:
                questions.append(pools[kind].pop(rng.randrange(len(pools[kind]))))
    return questions


# ---------------------------------------------------------------------------------------------------
# Text corpus
# ---------------------------------------------------------------------------------------------------
def text_document(scene: Scene, rng: random.Random) -> str:
    """One line: half the time a plain caption, otherwise a text about the scene followed by questions it
    answers, in the zero-shot VQA prompt style ("... Question: What color is the circle? Answer: red").
    The text is a full description (colour, shape, size and position of every object) or, as often, a
    caption of any template: a language model that answers from a description must also read the
    captions a student learns to write. A caption without positions is never asked where things are."""
    if rng.random() < 0.5:
        return caption_scene(scene, rng, 1)[0]
    count = rng.choices((1, 2, 3), weights=(5, 3, 2))[0]
    if rng.random() < 0.5:
        return _with_questions(describe_scene(scene, rng), ask_questions(scene, rng, count))
    template = rng.choice(SINGLE_TEMPLATES if len(scene.objects) == 1 else PAIR_TEMPLATES)
    kinds = [kind for kind in QUESTION_KINDS if kind != "position" or "{pa}" in template]
    return _with_questions(template.format(**_phrases(scene, rng)), ask_questions(scene, rng, count, kinds))


def _with_questions(text: str, questions: list[Question]) -> str:
    return f"{text}. " + " ".join(f"Question: {q.text} Answer: {q.answer}" for q in questions)


def text_corpus(params: SynthParams) -> tuple[list[str], list[str]]:
    """(train lines, held-out lines): documents about scenes of their own streams; held-out lines
    are distinct and never appear in the train lines."""
    train_rng = stream(params.seed, "text-train", "words")
    train = [
        text_document(scene, train_rng)
        for scene in sample_scenes(params.seed, "text-train", params.text_scenes)
    ]
    target = max(1, round(params.text_scenes * 0.05))
    taken = set(train)
    heldout_rng = stream(params.seed, "text-heldout", "words")
    heldout: list[str] = []
    scenes = scene_stream(params.seed, "text-heldout")
    for _ in range(50 * target + 1000):
        document = text_document(next(scenes), heldout_rng)
        if document not in taken:
            taken.add(document)
            heldout.append(document)
            if len(heldout) == target:
                break
    if len(heldout) < target:
        logger.warning(
            "only %d of %d held-out text lines are new; the corpus is saturated", len(heldout), target
        )
    return train, heldout
