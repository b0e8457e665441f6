"""The synthetic world: shapes on backgrounds, captions, VQA with human-like answers, and a text corpus.

Everything is drawn from seeded random streams, so the same `SynthParams` give byte-identical files.
Each part of the world has its own stream (`_stream(seed, part, use)`), so the eval scenes do not
change when the training set grows, and the text corpus is sampled from scenes of its own: it never
describes an eval or shifted image.

Layout under the output folder (see `generate_world`):

    world.json                      manifest: params, splits, vocabulary, sha256 of every other file
    urls.parquet                    url, caption, captions (list) for every training image
    images/{train,eval,shifted}/    NNNNNN.png, RGB, image_size x image_size
    scenes/{train,eval,shifted}.jsonl   one JSON object per image (SCENE_FIELDS), line i = image i
    vqa/, captions/                 eval split: VQA questions/annotations and COCO captions
    tasks/                          the fine-tuning tasks, with copies of their images (vlkd/world/tasks.py)
    shifted/vqa/, shifted/captions/ the same for the domain-shifted split
    text/train.txt, text/heldout.txt    the language-model corpus, one document per line
    pretrain/NNNNN.tar              the embedded teacher's own image-text pairs, as webdataset shards

Train and eval images never contain a HELD_OUT_PAIRS colour-shape pair and use BACKGROUNDS; every
shifted image has a SHIFTED_BACKGROUNDS background and at least one held-out pair. The text corpus
and the teacher's pretraining pairs use every pair and every background: the language model knows all
the words and the teacher all the images, as a real BART and a web-scale CLIP know more than the
corpus that is distilled on. The shifted split then asks what VLKD claims: whether the student answers
about what only its teachers have seen.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlkd.config import SynthParams
from vlkd.data.webdataset import add_member
from vlkd.errors import VlkdError
from vlkd.io import building_folder

logger = logging.getLogger(__name__)

WORLD_MANIFEST = "world.json"
FORMAT = 1

# ---------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "middle")
BACKGROUNDS = ("gray", "beige", "sky")
SHIFTED_BACKGROUNDS = ("navy", "checkered", "noise")
HELD_OUT_PAIRS = (("green", "triangle"), ("purple", "circle"), ("orange", "square"), ("blue", "star"))

ALL_PAIRS = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)
SEEN_PAIRS = tuple(pair for pair in ALL_PAIRS if pair not in HELD_OUT_PAIRS)
SPLITS = ("train", "eval", "shifted")
PRETRAIN_FOLDER = "pretrain"
PRETRAIN_SHARD_SIZE = 1000
ANSWERS_PER_QUESTION = 10
EVAL_CAPTIONS = 5
SCENE_FIELDS = (
    "image_id, file_name, background, texture, objects: [colour, shape, size, position, jitter, centre]"
)

COLOUR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 215, 20),
    "purple": (140, 45, 185),
    "orange": (250, 130, 20),
    "white": (255, 255, 255),
    "black": (15, 15, 15),
}
BACKGROUND_RGB = {
    "gray": (170, 170, 170),
    "beige": (215, 195, 160),
    "sky": (160, 200, 235),
    "navy": (30, 40, 95),
}
_CHECKER_RGB = ((200, 200, 200), (95, 95, 95))
_BACKGROUND_PHRASES = {
    "gray": "a gray background",
    "beige": "a beige background",
    "sky": "a light blue background",
    "navy": "a navy background",
    "checkered": "a checkered background",
    "noise": "a noisy background",
}
_POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}
_GRID = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "middle": (1, 1)}
_RADIUS = {"small": 0.08, "large": 0.13}  # fraction of the image side
_JITTER = 0.02  # largest offset of an object's centre, fraction of the image side
_SUPERSAMPLE = 2  # draw at twice the size, then average down: smooth edges, exact interior colours

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


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    position: str
    jitter: tuple[float, float]  # offset of the centre from its grid cell, each in [-1, 1] x _JITTER

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    background: str
    texture: int  # seed of the background texture (checkered phase, noise)
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class Question:
    kind: str  # a key of QUESTION_KINDS
    text: str
    answer: str  # the canonical answer


# ---------------------------------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------------------------------
def _stream(seed: int, part: str, use: str) -> random.Random:
    """An independent, reproducible random stream for one part of the world (string seeds are hashed
    with SHA-512 by `random`, not by Python's randomised `hash`)."""
    return random.Random(f"vlkd-synth/{seed}/{part}/{use}")


def _scene_rules(part: str) -> tuple[Sequence[str], Sequence[tuple[str, str]], bool]:
    """(backgrounds, colour-shape pairs, must show a held-out pair) for a split, the text corpus or the
    teacher's pretraining pairs."""
    if part in ("train", "eval"):
        return BACKGROUNDS, SEEN_PAIRS, False
    if part == "shifted":
        return SHIFTED_BACKGROUNDS, ALL_PAIRS, True
    return BACKGROUNDS + SHIFTED_BACKGROUNDS, ALL_PAIRS, False


def sample_scene(
    rng: random.Random, backgrounds: Sequence[str], pairs: Sequence[tuple[str, str]], held_out: bool = False
) -> Scene:
    """One or two objects at different positions, never two of the same colour and shape. With
    `held_out`, one object is a HELD_OUT_PAIRS pair."""
    count = 1 if rng.random() < 0.4 else 2
    positions = rng.sample(POSITIONS, count)
    chosen = [rng.choice(HELD_OUT_PAIRS if held_out else pairs)]
    if count == 2:
        chosen.append(rng.choice([pair for pair in pairs if pair != chosen[0]]))
        rng.shuffle(chosen)
    objects = tuple(
        SceneObject(colour, shape, rng.choice(SIZES), position, _sample_jitter(rng))
        for (colour, shape), position in zip(chosen, positions, strict=True)
    )
    return Scene(rng.choice(backgrounds), rng.getrandbits(32), objects)


def _sample_jitter(rng: random.Random) -> tuple[float, float]:
    return (round(rng.uniform(-1, 1), 3), round(rng.uniform(-1, 1), 3))


def scene_stream(seed: int, part: str) -> Iterator[Scene]:
    """The endless sequence of scenes of a split ("train", "eval", "shifted"), of the text corpus
    ("text-train", "text-heldout") or of the teacher's pretraining pairs ("pretrain")."""
    rng = _stream(seed, part, "scenes")
    backgrounds, pairs, held_out = _scene_rules(part)
    while True:
        yield sample_scene(rng, backgrounds, pairs, held_out)


def sample_scenes(seed: int, part: str, count: int) -> list[Scene]:
    stream = scene_stream(seed, part)
    return [next(stream) for _ in range(count)]


def split_scenes(params: SynthParams) -> dict[str, list[Scene]]:
    """The scenes of every image split, image i of a split being scene i."""
    counts = {"train": params.images, "eval": params.eval_images, "shifted": params.shifted_images}
    return {split: sample_scenes(params.seed, split, counts[split]) for split in SPLITS}


# ---------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------
def object_centre(obj: SceneObject, size: int) -> tuple[float, float]:
    """The object's centre in pixels of a `size` x `size` image, kept so the object fits inside."""
    radius = _RADIUS[obj.size] * size
    centre = []
    for cell, jitter in zip(_GRID[obj.position], obj.jitter, strict=True):
        value = (cell + 0.5) / 3 * size + jitter * _JITTER * size
        centre.append(min(max(value, radius + 1), size - radius - 1))
    return (centre[0], centre[1])


def draw_scene(scene: Scene, size: int) -> Image.Image:
    """The scene as an RGB image, `size` pixels square."""
    canvas = _background(scene, size).resize((size * _SUPERSAMPLE,) * 2, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        x, y = object_centre(obj, size)
        radius = _RADIUS[obj.size] * size * _SUPERSAMPLE
        _draw_shape(draw, obj.shape, x * _SUPERSAMPLE, y * _SUPERSAMPLE, radius, COLOUR_RGB[obj.colour])
    return canvas.resize((size, size), Image.Resampling.BOX)


def _background(scene: Scene, size: int) -> Image.Image:
    if scene.background in BACKGROUND_RGB:
        return Image.new("RGB", (size, size), BACKGROUND_RGB[scene.background])
    rng = np.random.default_rng(scene.texture)
    if scene.background == "checkered":
        cell = max(size // 8, 2)
        dy, dx = rng.integers(0, cell, size=2)
        yy, xx = np.mgrid[0:size, 0:size]
        pixels = np.array(_CHECKER_RGB, dtype=np.uint8)[((yy + dy) // cell + (xx + dx) // cell) % 2]
    elif scene.background == "noise":
        grey = rng.integers(60, 190, size=(size, size, 1), dtype=np.uint8)
        pixels = np.repeat(grey, 3, axis=2)
    else:
        known = ", ".join([*BACKGROUND_RGB, "checkered", "noise"])
        raise VlkdError(f"unknown background {scene.background!r}; use one of {known}")
    return Image.fromarray(pixels, "RGB")


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill: tuple[int, int, int]
) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        half = 0.85 * r
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    else:
        draw.polygon(_polygon(shape, x, y, r), fill=fill)


def _polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":  # pointing up, enlarged and lowered to look as big as the others
        return [_polar(x, y + 0.15 * r, 1.15 * r, angle) for angle in (-90, 30, 150)]
    if shape == "diamond":  # narrower than a square turned by 45 degrees, so the two never look alike
        return [(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)]
    if shape == "star":
        return [_polar(x, y, r if k % 2 == 0 else 0.45 * r, -90 + 36 * k) for k in range(10)]
    raise VlkdError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def _polar(x: float, y: float, r: float, degrees: float) -> tuple[float, float]:
    return (x + r * math.cos(math.radians(degrees)), y + r * math.sin(math.radians(degrees)))


# ---------------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------------
def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where `a` is relative to `b` (vertical wins when both differ)."""
    (ax, ay), (bx, by) = _GRID[a.position], _GRID[b.position]
    if ay != by:
        return "above" if ay < by else "below"
    return "to the left of" if ax < bx else "to the right of"


def _phrases(scene: Scene, rng: random.Random) -> dict[str, str]:
    """Template fields for the scene, its objects mentioned in a random order."""
    objects = list(scene.objects)
    rng.shuffle(objects)
    fields = {"bg": _BACKGROUND_PHRASES[scene.background]}
    for key, obj in zip("ab", objects, strict=False):
        fields[key] = _with_article(f"{obj.colour} {obj.shape}")
        fields["s" + key] = _with_article(f"{obj.size} {obj.colour} {obj.shape}")
        fields["p" + key] = _POSITION_PHRASES[obj.position]
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
def _unique(items: Sequence[str]) -> list[str]:
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
        for c in _unique([*colours, absent_colour])
    ]
    questions += [
        Question("count", f"How many {s}s are there?", str(shapes.count(s)))
        for s in _unique([*shapes, absent_shape])
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
        Question("exists", f"Is there {_with_article(f'{shown.colour} {shown.shape}')}?", "yes"),
        Question("exists", f"Is there {_with_article(f'{absent[0]} {absent[1]}')}?", "no"),
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
# Human answers
# ---------------------------------------------------------------------------------------------------
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
            [f"the {answer}", _with_article(answer)] if question.kind == "shape" else [f"the {answer}"]
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
    return [typo for typo in _unique(swapped) if typo != word] if len(word) >= 3 else []


def _confidence(rng: random.Random, noisy: bool) -> str:
    weights = (4, 5, 1) if noisy else (17, 3, 0)
    return rng.choices(("yes", "maybe", "no"), weights=weights)[0]


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
    train_rng = _stream(params.seed, "text-train", "words")
    train = [
        text_document(scene, train_rng)
        for scene in sample_scenes(params.seed, "text-train", params.text_scenes)
    ]
    target = max(1, round(params.text_scenes * 0.05))
    taken = set(train)
    heldout_rng = _stream(params.seed, "text-heldout", "words")
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


# ---------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------
def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, sort_keys=True, indent=2) + "\n", encoding="utf-8")


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _image_name(image_id: int) -> str:
    return f"{image_id:06d}.png"


def _write_images(folder: Path, scenes: Sequence[Scene], size: int, split: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, scene in enumerate(tqdm(scenes, desc=f"drawing {split}", unit="img", disable=None)):
        draw_scene(scene, size).save(
            folder / _image_name(image_id), format="PNG", optimize=False, compress_level=6
        )


def _scene_record(image_id: int, scene: Scene, size: int) -> dict[str, Any]:
    objects = [
        {
            "colour": obj.colour,
            "shape": obj.shape,
            "size": obj.size,
            "position": obj.position,
            "jitter": list(obj.jitter),
            "centre": [round(value, 2) for value in object_centre(obj, size)],
        }
        for obj in scene.objects
    ]
    record = {"image_id": image_id, "file_name": _image_name(image_id), "background": scene.background}
    return record | {"texture": scene.texture, "objects": objects}


def _write_scenes(path: Path, scenes: Sequence[Scene], size: int) -> None:
    rows = [json.dumps(_scene_record(i, scene, size), sort_keys=True) for i, scene in enumerate(scenes)]
    _write_lines(path, rows)


def _write_urls(path: Path, base_url: str, captions: Sequence[list[str]]) -> None:
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("captions", pa.list_(pa.string()))])
    columns = {
        "url": [f"{base_url}/images/train/{_image_name(i)}" for i in range(len(captions))],
        "caption": [texts[0] for texts in captions],
        "captions": list(captions),
    }
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), path, compression="snappy")


def _info(split: str, params: SynthParams) -> dict[str, Any]:
    return {
        "description": f"vlkd synthetic world, {split} split",
        "version": str(FORMAT),
        "seed": params.seed,
        "contributor": "vlkd",
    }


def _coco_captions(split: str, captions: Sequence[list[str]], params: SynthParams) -> dict[str, Any]:
    size = params.image_size
    images = [
        {"id": i, "file_name": _image_name(i), "width": size, "height": size} for i in range(len(captions))
    ]
    annotations = [
        {"id": image_id * EVAL_CAPTIONS + k, "image_id": image_id, "caption": caption}
        for image_id, texts in enumerate(captions)
        for k, caption in enumerate(texts)
    ]
    return {"info": _info(split, params), "licenses": [], "images": images, "annotations": annotations}


def _vqa_files(
    split: str, scenes: Sequence[Scene], rng: random.Random, params: SynthParams
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(questions file, annotations file) in the official VQA formats."""
    questions, annotations = [], []
    for image_id, scene in enumerate(scenes):
        for k, question in enumerate(ask_questions(scene, rng, rng.randint(4, 6))):
            question_id = image_id * 10 + k
            questions.append({"question_id": question_id, "image_id": image_id, "question": question.text})
            annotations.append(_vqa_annotation(question_id, image_id, question, rng))
    header = {"info": _info(split, params), "data_type": "synthetic", "data_subtype": split}
    return header | {"task_type": "Open-Ended", "questions": questions}, header | {"annotations": annotations}


def _vqa_annotation(
    question_id: int, image_id: int, question: Question, rng: random.Random
) -> dict[str, Any]:
    answers = human_answers(question, rng)
    question_type, answer_type = QUESTION_KINDS[question.kind]
    return {
        "question_id": question_id,
        "image_id": image_id,
        "question_type": question_type,
        "answer_type": answer_type,
        "multiple_choice_answer": Counter(answer for answer, _ in answers).most_common(1)[0][0],
        "answers": [
            {"answer": answer, "answer_confidence": confidence, "answer_id": k + 1}
            for k, (answer, confidence) in enumerate(answers)
        ],
    }


def _write_split(root: Path, split: str, scenes: Sequence[Scene], params: SynthParams) -> dict[str, Any]:
    """Images, scene metadata and the split's text files; returns the split's manifest entry."""
    entry: dict[str, Any] = {
        "images": f"images/{split}",
        "count": len(scenes),
        "scenes": f"scenes/{split}.jsonl",
    }
    _write_images(root / entry["images"], scenes, params.image_size, split)
    _write_scenes(root / entry["scenes"], scenes, params.image_size)
    rng = _stream(params.seed, split, "words")
    if split == "train":
        captions = [caption_scene(scene, rng, params.captions_per_image) for scene in scenes]
        _write_urls(root / "urls.parquet", _base_url(params), captions)
        return entry | {"urls": "urls.parquet", "captions_per_image": params.captions_per_image}
    prefix = "" if split == "eval" else f"{split}/"
    entry |= {
        "questions": f"{prefix}vqa/questions.json",
        "annotations": f"{prefix}vqa/annotations.json",
        "captions": f"{prefix}captions/annotations.json",
    }
    captions = [caption_scene(scene, rng, EVAL_CAPTIONS) for scene in scenes]
    _write_json(root / entry["captions"], _coco_captions(split, captions, params))
    questions, annotations = _vqa_files(split, scenes, rng, params)
    _write_json(root / entry["questions"], questions)
    _write_json(root / entry["annotations"], annotations)
    return entry | {"question_count": len(questions["questions"])}


def _write_text(root: Path, params: SynthParams) -> dict[str, Any]:
    train, heldout = text_corpus(params)
    entry = {"train": "text/train.txt", "heldout": "text/heldout.txt"}
    _write_lines(root / entry["train"], train)
    _write_lines(root / entry["heldout"], heldout)
    return entry | {"train_documents": len(train), "heldout_documents": len(heldout)}


def _write_pretraining(root: Path, params: SynthParams) -> dict[str, Any]:
    """The teacher's pretraining pairs as webdataset shards, each sample as img2dataset writes one (jpg,
    txt: its first caption, json: {"captions": [...]}), so the teacher stage reads them as it reads a
    downloaded corpus. JPEG as the web's images are; tar members with fixed metadata, so the shards'
    bytes depend on the params only."""
    entry = {"shards": PRETRAIN_FOLDER, "count": params.pretrain_images, "shard_size": PRETRAIN_SHARD_SIZE}
    if not params.pretrain_images:
        return entry | {"shard_count": 0}
    scenes = sample_scenes(params.seed, "pretrain", params.pretrain_images)
    rng = _stream(params.seed, "pretrain", "words")
    folder = root / PRETRAIN_FOLDER
    folder.mkdir(parents=True)
    starts = range(0, len(scenes), PRETRAIN_SHARD_SIZE)
    for shard, start in enumerate(tqdm(starts, desc="drawing pretraining shards", unit="shard", disable=None)):
        with tarfile.open(folder / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, min(start + PRETRAIN_SHARD_SIZE, len(scenes))):
                captions = caption_scene(scenes[index], rng, params.captions_per_image)
                image = io.BytesIO()
                draw_scene(scenes[index], params.image_size).save(image, format="JPEG", quality=95)
                key = f"{index:09d}"
                add_member(tar, f"{key}.jpg", image.getvalue())
                add_member(tar, f"{key}.txt", captions[0].encode())
                add_member(tar, f"{key}.json", json.dumps({"key": key, "captions": captions}).encode())
    return entry | {"shard_count": len(starts)}


def _base_url(params: SynthParams) -> str:
    return f"http://127.0.0.1:{params.port}"


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() != WORLD_MANIFEST
    }


def _manifest(
    root: Path, params: SynthParams, splits: dict[str, Any], text: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "seed": params.seed,
        "params": params.model_dump(mode="json", exclude={"output"}),
        "port": params.port,
        "base_url": _base_url(params),
        "splits": splits,
        "text": text,
        "scene_fields": SCENE_FIELDS,
        "vocabulary": {
            "colours": list(COLOURS),
            "shapes": list(SHAPES),
            "sizes": list(SIZES),
            "backgrounds": list(BACKGROUNDS),
            "shifted_backgrounds": list(SHIFTED_BACKGROUNDS),
            "held_out_pairs": [list(pair) for pair in HELD_OUT_PAIRS],
            "positions": list(POSITIONS),
        },
        "files": _file_hashes(root),
    }


# ---------------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------------


def _build(root: Path, params: SynthParams) -> dict[str, Any]:
    from vlkd.world.tasks import write_tasks  # tasks builds on this module's scenes and writers

    scenes = split_scenes(params)
    splits = {split: _write_split(root, split, scenes[split], params) for split in SPLITS}
    text = _write_text(root, params)
    pretrain = _write_pretraining(root, params)
    tasks = write_tasks(root, scenes, params)
    manifest = _manifest(root, params, splits, text) | {"tasks": tasks, "pretrain": pretrain}
    _write_json(root / WORLD_MANIFEST, manifest)
    return manifest


def generate_world(output: Path, params: SynthParams) -> dict[str, Any]:
    """Write the synthetic world into `output` (params.output is ignored) and return its manifest,
    which is also `output/world.json`. Built whole, then swapped in (`building_folder`)."""
    with building_folder(Path(output), WORLD_MANIFEST, "synthetic world", "synth.output") as building:
        manifest = _build(building, params)
    splits = manifest["splits"]
    logger.info(
        "synthetic world in %s: %d train, %d eval (%d questions), %d shifted images, %d text documents",
        output,
        splits["train"]["count"],
        splits["eval"]["count"],
        splits["eval"]["question_count"],
        splits["shifted"]["count"],
        manifest["text"]["train_documents"],
    )
    return manifest
