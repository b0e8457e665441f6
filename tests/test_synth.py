"""The synthetic world: determinism, file formats, held-out design, answer noise and the text corpus."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlkd.config import SynthParams
from vlkd.data.webdataset import list_shards, read_pairs
from vlkd.errors import VlkdError
from vlkd.record import RECORD
from vlkd.world.answers import human_answers
from vlkd.world.drawing import BACKGROUND_RGB, COLOUR_RGB, draw_scene
from vlkd.world.language import (
    POSITION_PHRASES,
    QUESTION_KINDS,
    Question,
    ask_questions,
    caption_scene,
    text_corpus,
    text_document,
)
from vlkd.world.noise import NOISE_KINDS
from vlkd.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    SHIFTED_BACKGROUNDS,
    Scene,
    SceneObject,
    sample_scenes,
    split_scenes,
    stream,
)
from vlkd.world.synth import PRETRAIN_SHARD_SIZE, WORLD_MANIFEST, generate_world

TINY = SynthParams(images=20, eval_images=10, shifted_images=5, text_scenes=50, pretrain_images=12,
                   image_size=64)
EVAL_SPLITS = {"eval": "", "shifted": "shifted/"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "world"
    generate_world(root, TINY)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


def _load(root: Path, relative: str) -> dict:
    return json.loads((root / relative).read_text())


def _scenes(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"scenes/{split}.jsonl").read_text().splitlines()]


# --- determinism and the manifest ------------------------------------------------------------------
def test_same_params_give_byte_identical_worlds(world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_world(again, TINY)
    first, second = _files(world), _files(again)
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []


def test_another_seed_gives_another_world(world: Path, tmp_path: Path) -> None:
    generate_world(tmp_path / "other", TINY.model_copy(update={"seed": 1}))
    other, same = _files(tmp_path / "other"), _files(world)
    for name in ("urls.parquet", "vqa/annotations.json", "text/train.txt", "images/eval/000000.png"):
        assert other[name] != same[name], name


def test_manifest_describes_the_world(world: Path) -> None:
    manifest = _load(world, WORLD_MANIFEST)
    assert manifest["format"] == 1 and manifest["seed"] == TINY.seed and manifest["port"] == TINY.port
    assert manifest["base_url"] == f"http://127.0.0.1:{TINY.port}"
    # A clean world leaves out the noise shares (all 0), so it is the world made before they existed.
    assert manifest["params"] == TINY.model_dump(mode="json", exclude={"output", *NOISE_KINDS.values()})
    assert {split: entry["images"] for split, entry in manifest["splits"].items()} == {
        "train": "images/train",
        "eval": "images/eval",
        "shifted": "images/shifted",
    }
    assert [manifest["splits"][s]["count"] for s in ("train", "eval", "shifted")] == [20, 10, 5]
    vocabulary = manifest["vocabulary"]
    assert vocabulary["colours"] == list(COLOURS) and vocabulary["shapes"] == list(SHAPES)
    assert vocabulary["positions"] == list(POSITIONS)
    assert vocabulary["held_out_pairs"] == [list(pair) for pair in HELD_OUT_PAIRS]
    on_disk = {name: hashlib.sha256(data).hexdigest() for name, data in _files(world).items()}
    del on_disk[WORLD_MANIFEST], on_disk[RECORD]  # the manifest, and the run's record (vlkd.record)
    assert manifest["files"] == on_disk
    for entry in manifest["splits"].values():
        assert (world / entry["scenes"]).is_file()


def test_generate_returns_the_written_manifest(tmp_path: Path) -> None:
    manifest = generate_world(tmp_path / "w", TINY.model_copy(update={"images": 3, "text_scenes": 10}))
    assert manifest == _load(tmp_path / "w", WORLD_MANIFEST)


# --- atomic replacement ----------------------------------------------------------------------------
def test_regenerating_replaces_the_old_world_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "world"
    small = TINY.model_copy(update={"images": 3, "eval_images": 2, "shifted_images": 1, "text_scenes": 10})
    generate_world(target, small)
    (target / "stale.txt").write_text("from an older run")
    (tmp_path / ".world.building").mkdir()  # left by a killed run
    (tmp_path / ".world.building" / "half.png").write_bytes(b"")
    generate_world(target, small.model_copy(update={"images": 4}))
    assert not (target / "stale.txt").exists()
    assert len(list((target / "images/train").iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]


def test_refuses_to_replace_a_folder_that_is_not_a_world(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("do not delete")
    with pytest.raises(VlkdError, match="not a synthetic world folder"):
        generate_world(target, TINY)
    assert (target / "thesis.tex").read_text() == "do not delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


# --- training URL list and images ------------------------------------------------------------------
def test_url_list_points_at_the_local_server(world: Path) -> None:
    table = pq.read_table(world / "urls.parquet")
    assert table.schema.field("url").type == pa.string()
    assert table.schema.field("caption").type == pa.string()
    assert table.schema.field("captions").type == pa.list_(pa.string())
    rows = table.to_pylist()
    assert len(rows) == TINY.images
    prefix = f"http://127.0.0.1:{TINY.port}/"
    for row in rows:
        assert row["url"].startswith(prefix)
        assert (world / row["url"][len(prefix) :]).is_file()
        assert len(row["captions"]) == TINY.captions_per_image
        assert row["caption"] in row["captions"]
    assert len({row["url"] for row in rows}) == len(rows)


@pytest.mark.parametrize("split", ["train", "eval", "shifted"])
def test_images_show_their_scenes(world: Path, split: str) -> None:
    for scene in _scenes(world, split):
        image = Image.open(world / f"images/{split}" / scene["file_name"])
        assert image.mode == "RGB" and image.size == (TINY.image_size, TINY.image_size)
        for obj in scene["objects"]:
            x, y = (round(value) for value in obj["centre"])
            assert image.getpixel((x, y)) == COLOUR_RGB[obj["colour"]], (split, scene["file_name"], obj)
        if scene["background"] in BACKGROUND_RGB:
            assert image.getpixel((0, 0)) == BACKGROUND_RGB[scene["background"]]


def test_large_objects_cover_more_pixels_than_small_ones() -> None:
    def covered(size: str) -> int:
        scene = Scene("gray", 0, (SceneObject("red", "diamond", size, "middle", (0.0, 0.0)),))
        image = draw_scene(scene, 64)
        return sum(pixel == COLOUR_RGB["red"] for pixel in image.getdata())

    assert covered("large") > 2 * covered("small") > 0


# --- held-out design -------------------------------------------------------------------------------
def test_held_out_pairs_and_shifted_backgrounds_only_in_the_shifted_split(world: Path) -> None:
    held_out = {tuple(pair) for pair in HELD_OUT_PAIRS}
    for split in ("train", "eval"):
        for scene in _scenes(world, split):
            assert scene["background"] in BACKGROUNDS
            assert not {(o["colour"], o["shape"]) for o in scene["objects"]} & held_out
    for scene in _scenes(world, "shifted"):
        assert scene["background"] in SHIFTED_BACKGROUNDS
        assert {(o["colour"], o["shape"]) for o in scene["objects"]} & held_out
    # The same rule over many scenes than the tiny world has.
    big = split_scenes(TINY.model_copy(update={"images": 2000, "eval_images": 300}))
    for scene in big["train"] + big["eval"]:
        assert not {obj.pair for obj in scene.objects} & held_out
        assert scene.background in BACKGROUNDS


def test_pretraining_pairs_are_shards_of_every_background_and_pair(world: Path) -> None:
    """The teacher's own pairs: webdataset shards that the teacher's reader takes as a downloaded corpus,
    each image drawn from its scene with that scene's captions, over every background and every pair."""
    manifest = _load(world, WORLD_MANIFEST)["pretrain"]
    assert manifest == {"shards": "pretrain", "count": 12, "shard_size": PRETRAIN_SHARD_SIZE, "shard_count": 1}
    pairs = read_pairs(list_shards(world / "pretrain"))
    assert pairs.bad == [] and pairs.unreadable == {} and pairs.keys == [f"{i:09d}" for i in range(12)]
    scenes = sample_scenes(TINY.seed, "pretrain", 12)
    rng = stream(TINY.seed, "pretrain", "words")
    for image, texts, scene in zip(pairs.images, pairs.captions, scenes, strict=True):
        assert list(texts) == caption_scene(scene, rng, TINY.captions_per_image)
        decoded = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=float)
        drawn = np.asarray(draw_scene(scene, TINY.image_size), dtype=float)
        assert np.abs(decoded - drawn).mean() < 8  # the scene's image through JPEG (noise: 3 grey levels)
    many = sample_scenes(TINY.seed, "pretrain", 2000)
    assert {scene.background for scene in many} == set(BACKGROUNDS + SHIFTED_BACKGROUNDS)
    assert {obj.pair for scene in many for obj in scene.objects} >= {tuple(pair) for pair in HELD_OUT_PAIRS}


def test_growing_the_corpus_leaves_the_pretraining_shards_as_they_were(world: Path, tmp_path: Path) -> None:
    generate_world(tmp_path / "grown", TINY.model_copy(update={"images": TINY.images + 5}))
    assert (tmp_path / "grown/pretrain/00000.tar").read_bytes() == (world / "pretrain/00000.tar").read_bytes()
    generate_world(tmp_path / "none", TINY.model_copy(update={"pretrain_images": 0}))
    assert not (tmp_path / "none/pretrain").exists()


def test_two_object_scenes_use_two_positions_and_two_looks() -> None:
    scenes = sample_scenes(0, "train", 500)
    pairs = [scene for scene in scenes if len(scene.objects) == 2]
    assert 100 < len(pairs) < 450
    for scene in pairs:
        first, second = scene.objects
        assert first.position != second.position and first.pair != second.pair


# --- VQA and COCO formats --------------------------------------------------------------------------
@pytest.mark.parametrize("split", EVAL_SPLITS)
def test_vqa_files_follow_the_official_format(world: Path, split: str) -> None:
    prefix = EVAL_SPLITS[split]
    questions = _load(world, f"{prefix}vqa/questions.json")
    annotations = _load(world, f"{prefix}vqa/annotations.json")
    coco = _load(world, f"{prefix}captions/annotations.json")
    assert isinstance(questions["info"], dict) and questions["task_type"] == "Open-Ended"
    assert questions["data_type"] == "synthetic" and questions["data_subtype"] == split
    assert annotations["data_type"] == "synthetic" and annotations["data_subtype"] == split
    image_ids = {image["id"] for image in coco["images"]}
    by_image = Counter(q["image_id"] for q in questions["questions"])
    assert set(by_image) == image_ids and all(4 <= n <= 6 for n in by_image.values())
    question_ids = [q["question_id"] for q in questions["questions"]]
    assert len(set(question_ids)) == len(question_ids)
    for q in questions["questions"]:
        assert (
            isinstance(q["question_id"], int)
            and isinstance(q["question"], str)
            and q["question"].endswith("?")
        )
    asked = {q["question_id"]: q["image_id"] for q in questions["questions"]}
    assert sorted(a["question_id"] for a in annotations["annotations"]) == sorted(question_ids)
    for annotation in annotations["annotations"]:
        assert asked[annotation["question_id"]] == annotation["image_id"]
        _check_annotation(annotation)


def _check_annotation(annotation: dict) -> None:
    kinds = {question_type: answer_type for question_type, answer_type in QUESTION_KINDS.values()}
    assert kinds[annotation["question_type"]] == annotation["answer_type"]
    answers = annotation["answers"]
    assert [a["answer_id"] for a in answers] == list(range(1, 11))
    assert all(isinstance(a["answer"], str) and a["answer"] for a in answers)
    assert all(a["answer_confidence"] in ("yes", "maybe", "no") for a in answers)
    counts = Counter(a["answer"] for a in answers)
    assert annotation["multiple_choice_answer"] == counts.most_common(1)[0][0]


@pytest.mark.parametrize("split", EVAL_SPLITS)
def test_coco_captions_follow_the_format(world: Path, split: str) -> None:
    coco = _load(world, f"{EVAL_SPLITS[split]}captions/annotations.json")
    assert coco["licenses"] == [] and isinstance(coco["info"], dict)
    images = coco["images"]
    assert len(images) == len({image["id"] for image in images}) == len(_scenes(world, split))
    for image in images:
        assert (world / f"images/{split}" / image["file_name"]).is_file()
        assert image["width"] == image["height"] == TINY.image_size
    ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ids)) == len(ids)
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    assert per_image == {image["id"]: 5 for image in images}
    scenes = {scene["image_id"]: scene for scene in _scenes(world, split)}
    for annotation in coco["annotations"]:
        for obj in scenes[annotation["image_id"]]["objects"]:  # every caption names every object
            assert f"{obj['colour']} {obj['shape']}" in annotation["caption"]
        assert not re.search(r"\b(a|an|one|single) (a|an)\b", annotation["caption"]), annotation
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", annotation["caption"]), annotation
    for image in images:
        texts = [a["caption"] for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert len(set(texts)) == 5


# --- questions and answers -------------------------------------------------------------------------
def _reference_answer(question: str, scene: Scene) -> str:
    """The answer worked out from the question text, independently of the generator."""
    objects = scene.objects
    words = question.rstrip("?").split()
    if question.startswith("What color is the "):
        return next(o.colour for o in objects if o.shape == words[-1])
    if question.startswith("What shape is the "):
        return next(o.shape for o in objects if o.colour == words[-2])
    if question == "How many shapes are there?":
        return str(len(objects))
    if question.startswith("How many "):
        target = words[2]
        return str(sum(o.colour == target or o.shape + "s" == target for o in objects))
    if question.startswith("Is there "):
        return "yes" if (words[-2], words[-1]) in [o.pair for o in objects] else "no"
    if question.startswith("Where is the "):
        return next(o.position for o in objects if (o.colour, o.shape) == (words[-2], words[-1]))
    raise AssertionError(f"unexpected question {question!r}")


def test_questions_have_correct_answers_and_a_mix_of_kinds() -> None:
    rng = random.Random(3)
    kinds: Counter[str] = Counter()
    yes_no: Counter[str] = Counter()
    for scene in sample_scenes(0, "eval", 300):
        questions = ask_questions(scene, rng, 5)
        assert len({q.text for q in questions}) == len(questions) == 5
        for question in questions:
            assert question.answer == _reference_answer(question.text, scene), (question, scene)
            kinds[question.kind] += 1
            if question.kind == "exists":
                yes_no[question.answer] += 1
    assert set(kinds) == set(QUESTION_KINDS)
    assert min(kinds.values()) > 100
    assert 0.4 < yes_no["yes"] / sum(yes_no.values()) < 0.6


def test_colour_question_only_for_a_unique_shape() -> None:
    scene = Scene(
        "gray",
        0,
        (
            SceneObject("red", "circle", "small", "left", (0.0, 0.0)),
            SceneObject("blue", "circle", "large", "right", (0.0, 0.0)),
        ),
    )
    for seed in range(20):
        for question in ask_questions(scene, random.Random(seed), 6):
            assert not question.text.startswith("What color is the")


def test_human_answers_are_noisy_but_the_canonical_answer_wins(world: Path) -> None:
    rng = random.Random(7)
    questions = [
        Question("count", "How many shapes are there?", "2"),
        Question("colour", "What color is the star?", "purple"),
        Question("position", "Where is the red circle?", "middle"),
        Question("exists", "Is there a blue square?", "no"),
        Question("shape", "What shape is the red object?", "circle"),
    ]
    identical, variants = 0, Counter()
    for k in range(1000):
        question = questions[k % len(questions)]
        answers = [answer for answer, _ in human_answers(question, rng)]
        counts = Counter(answers)
        assert len(answers) == 10 and counts.most_common(1)[0][0] == question.answer
        assert counts[question.answer] >= 6
        identical += len(counts) == 1
        variants.update(answer for answer in answers if answer != question.answer)
    assert 0.3 < identical / 1000 < 0.5
    for expected in ("two", "Purple", "purple.", "center", "violet", "the middle", "a circle", "yes"):
        assert variants[expected] > 0, expected
    # The tiny world's own questions: both kinds, and the majority answer is the canonical one.
    scenes = split_scenes(TINY)["eval"]
    annotations = _load(world, "vqa/annotations.json")["annotations"]
    questions_file = {
        q["question_id"]: q["question"] for q in _load(world, "vqa/questions.json")["questions"]
    }
    spreads = set()
    for annotation in annotations:
        canonical = _reference_answer(
            questions_file[annotation["question_id"]], scenes[annotation["image_id"]]
        )
        assert annotation["multiple_choice_answer"] == canonical
        spreads.add(len({a["answer"] for a in annotation["answers"]}) == 1)
    assert spreads == {True, False}


# --- text corpus -----------------------------------------------------------------------------------
def test_text_corpus_mixes_captions_and_questions(world: Path) -> None:
    train = (world / "text/train.txt").read_text().splitlines()
    heldout = (world / "text/heldout.txt").read_text().splitlines()
    assert len(train) == TINY.text_scenes and len(heldout) >= 1
    assert not set(heldout) & set(train)
    assert len(set(heldout)) == len(heldout)
    with_questions = [line for line in train if " Question: " in line]
    assert with_questions and len(with_questions) < len(train)
    for line in with_questions:
        description, _, qa = line.partition(". Question: ")
        assert description and " Answer: " in qa and not line.endswith(" ")


def test_text_answers_match_the_scene_they_describe() -> None:
    rng = random.Random(5)
    for scene in sample_scenes(5, "text-train", 200):
        line = text_document(scene, rng)
        for chunk in line.split(" Question: ")[1:]:
            question, _, answer = chunk.partition(" Answer: ")
            assert answer == _reference_answer(question, scene), line


def test_text_questions_are_answerable_from_the_text_before_them() -> None:
    """Position questions only follow texts that state positions; every text names each object's
    colour and shape, which every other kind of question needs."""
    rng = random.Random(6)
    position_phrases = tuple(POSITION_PHRASES.values())
    texts = {"with positions": 0, "without": 0}
    for scene in sample_scenes(6, "text-train", 400):
        line = text_document(scene, rng)
        text, _, questions = line.partition(". Question: ")
        if not questions:
            continue
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape}" in text, line
        has_positions = sum(phrase in text for phrase in position_phrases) == len(scene.objects)
        texts["with positions" if has_positions else "without"] += 1
        assert has_positions or "Where is the" not in questions, line
    assert min(texts.values()) > 20, texts


def test_text_never_comes_from_eval_or_shifted_scenes(world: Path) -> None:
    """Text scenes are drawn from their own streams: none of them is an image scene (a scene holds
    32 random bits of texture and four jitters, so equal scenes mean a shared stream)."""
    train, _ = text_corpus(TINY)
    assert (world / "text/train.txt").read_text().splitlines() == train
    rng = stream(TINY.seed, "text-train", "words")
    text_scenes = sample_scenes(TINY.seed, "text-train", TINY.text_scenes)
    assert [text_document(scene, rng) for scene in text_scenes] == train
    image_scenes = split_scenes(TINY.model_copy(update={"images": 200, "eval_images": 200}))
    text_side = set(text_scenes) | set(sample_scenes(TINY.seed, "text-heldout", 200))
    for split in ("train", "eval", "shifted"):
        assert not text_side & set(image_scenes[split]), split
    # The text corpus does use the held-out pairs and the shifted backgrounds as words.
    wide = sample_scenes(TINY.seed, "text-train", 2000)
    assert {obj.pair for scene in wide for obj in scene.objects} >= set(HELD_OUT_PAIRS)
    assert {scene.background for scene in wide} == set(BACKGROUNDS + SHIFTED_BACKGROUNDS)
