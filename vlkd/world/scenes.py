"""What is in an image: the world's vocabulary and its scenes (one or two coloured shapes on a background),
sampled from seeded random streams.

Each part of the world has its own stream (`stream(seed, part, use)`), so the eval scenes do not
change when the training set grows, and the text corpus is sampled from scenes of its own: it never
describes an eval or shifted image.

Train and eval images never contain a HELD_OUT_PAIRS colour-shape pair and use BACKGROUNDS; every
shifted image has a SHIFTED_BACKGROUNDS background and at least one held-out pair. The text corpus
and the teacher's pretraining pairs use every pair and every background: the language model knows all
the words and the teacher all the images, as a real BART and a web-scale CLIP know more than the
corpus that is distilled on. The shifted split then asks what VLKD claims: whether the student answers
about what only its teachers have seen.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from vlkd.config import SynthParams

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
# A position's cell (column, row) in a 3 x 3 grid: where drawing puts an object, and what "above" or
# "to the left of" mean in a caption.
GRID = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "middle": (1, 1)}


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    position: str
    jitter: tuple[float, float]  # offset of the centre from its grid cell, each in [-1, 1] x drawing's _JITTER

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    background: str
    texture: int  # seed of the background texture (checkered phase, noise)
    objects: tuple[SceneObject, ...]


# ---------------------------------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------------------------------
def stream(seed: int, part: str, use: str) -> random.Random:
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
    rng = stream(seed, part, "scenes")
    backgrounds, pairs, held_out = _scene_rules(part)
    while True:
        yield sample_scene(rng, backgrounds, pairs, held_out)


def sample_scenes(seed: int, part: str, count: int) -> list[Scene]:
    scenes = scene_stream(seed, part)
    return [next(scenes) for _ in range(count)]


def split_scenes(params: SynthParams) -> dict[str, list[Scene]]:
    """The scenes of every image split, image i of a split being scene i."""
    counts = {"train": params.images, "eval": params.eval_images, "shifted": params.shifted_images}
    return {split: sample_scenes(params.seed, split, counts[split]) for split in SPLITS}
