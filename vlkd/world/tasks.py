"""The world's fine-tuning tasks in their published formats: VQA (VQAv2 files) and visual entailment
(SNLI-VE jsonl), each with a training split on training images, an in-domain test split on the eval
images and a domain-shifted one on the shifted images (unseen backgrounds and colour-shape pairs).

Layout of the world's `tasks/` folder (`write_tasks`), self-contained as a released dataset is:

    images/{train,test,shifted}/NNNNNN.png     copies: the first `task_images` training images, the eval
                                               images, the shifted images
    vqa/{train,test,shifted}/questions.json, annotations.json   VQAv2 files; test and shifted are the
                                               zero-shot benchmarks' questions on the same images
    ve/snli_ve_{train,test,shifted}.jsonl      SNLI-VE rows

Visual entailment in the world. The premise is the image (`sentence1` is one of its captions, as SNLI-VE
keeps the Flickr30k caption the hypothesis was written for); each hypothesis is about one object:
- entailment: a true visible fact (it is there, its place, the number of shapes);
- contradiction: a false visible fact (a near-miss object that is not there, the wrong place, the wrong
  number), or an unobservable property of an object that is not there (a false presupposition, which
  SNLI's annotators label contradiction);
- neutral: an unobservable property (material, weight, age, owner) of an object that is there: the image
  cannot decide it.
So no label can be read from the hypothesis alone: the unobservable templates are neutral or
contradiction depending on the image, and the visible ones entailment or contradiction.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlkd.world.files import image_name, vqa_files, write_json
from vlkd.world.language import POSITION_PHRASES, caption_scene, with_article
from vlkd.world.scenes import COLOURS, POSITIONS, SHAPES, Scene, stream

TASKS = "tasks"

VE_LABELS = ("entailment", "neutral", "contradiction")
_PROPERTIES = ("is made of wood", "is made of metal", "is made of paper", "is heavy", "is very old",
               "was painted yesterday", "belongs to a child", "is warm to the touch")
_COUNT_WORDS = ("no", "one", "two", "three")


def write_tasks(root: Path, scenes: dict[str, Sequence[Scene]], params) -> dict[str, Any]:
    """Write the tasks' folder `root/tasks` (see the module's docstring) from `scenes` (split -> scenes,
    image i = scene i) and the splits' files already under `root`; returns the manifest entry. Each task
    draws from its own stream, so the rest of the world is unchanged, and the folder holds copies of the
    images it uses, so a world grown by a refresh leaves it byte for byte as it was."""
    tasks = root / TASKS
    train = scenes["train"][: params.task_images]
    counts = {"train": len(train), "test": len(scenes["eval"]), "shifted": len(scenes["shifted"])}
    for split, source in (("train", "train"), ("test", "eval"), ("shifted", "shifted")):
        (tasks / "images" / split).mkdir(parents=True)
        for image_id in range(counts[split]):
            name = image_name(image_id)
            shutil.copyfile(root / "images" / source / name, tasks / "images" / split / name)
    questions, annotations = vqa_files("train", train, stream(params.seed, "train", "vqa-task"), params)
    write_json(tasks / "vqa/train/questions.json", questions)
    write_json(tasks / "vqa/train/annotations.json", annotations)
    for split, prefix in (("test", ""), ("shifted", "shifted/")):  # the zero-shot benchmarks' questions
        for kind in ("questions", "annotations"):
            (tasks / "vqa" / split).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / f"{prefix}vqa/{kind}.json", tasks / "vqa" / split / f"{kind}.json")
    pairs = {}
    for split, source in (("train", "train"), ("test", "eval"), ("shifted", "shifted")):
        split_scenes = train if split == "train" else scenes[source]
        rows = entailment_rows(split_scenes, stream(params.seed, source, "ve-task"))
        _write_jsonl(tasks / f"ve/snli_ve_{split}.jsonl", rows)
        pairs[split] = len(rows)
    return {"folder": TASKS, "images": counts, "vqa_train_questions": len(questions["questions"]),
            "ve_pairs": pairs}


def entailment_rows(scenes: Sequence[Scene], rng: random.Random) -> list[dict[str, Any]]:
    """SNLI-VE rows: one hypothesis of each label per image."""
    rows = []
    for image_id, scene in enumerate(scenes):
        premise = caption_scene(scene, rng, 1)[0]
        for k, label in enumerate(VE_LABELS):
            rows.append({
                "Flickr30K_ID": str(image_id),
                "captionID": f"{image_id}#0",
                "pairID": f"{image_id}#0r{k}",
                "sentence1": premise,
                "sentence2": hypothesis(scene, label, rng),
                "gold_label": label,
            })
    return rows


def hypothesis(scene: Scene, label: str, rng: random.Random) -> str:
    """A statement about `scene` whose relation to the image is `label`."""
    present = [obj.pair for obj in scene.objects]
    shown = rng.choice(scene.objects)
    named = f"the {shown.colour} {shown.shape}"
    if label == "neutral":
        return f"{named} {rng.choice(_PROPERTIES)}"
    if label == "entailment":
        return rng.choice((
            f"there is {with_article(f'{shown.colour} {shown.shape}')}",
            f"{named} is {POSITION_PHRASES[shown.position]}",
            f"there {'is one shape' if len(present) == 1 else 'are two shapes'}",
        ))
    near = [(c, shown.shape) for c in COLOURS] + [(shown.colour, s) for s in SHAPES]
    absent = rng.choice([pair for pair in near if pair not in present])
    elsewhere = rng.choice([p for p in POSITIONS if p != shown.position])
    wrong_count = rng.choice([n for n in range(len(_COUNT_WORDS)) if n != len(present)])
    return rng.choice((
        f"there is {with_article(f'{absent[0]} {absent[1]}')}",
        f"{named} is {POSITION_PHRASES[elsewhere]}",
        f"there {'is' if wrong_count == 1 else 'are'} {_COUNT_WORDS[wrong_count]} "
        f"shape{'' if wrong_count == 1 else 's'}",
        f"the {absent[0]} {absent[1]} {rng.choice(_PROPERTIES)}",
    ))


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), encoding="utf-8")
