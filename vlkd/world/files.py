"""The world's files in their formats: JSON and text lines, PNG images with their scene records, the URL
list (parquet), COCO captions, VQA questions and annotations, and webdataset samples. Every writer is
deterministic, so the same scenes and streams give the same bytes."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from vlkd.config import SynthParams
from vlkd.data.webdataset import add_member
from vlkd.world.answers import human_answers
from vlkd.world.drawing import draw_scene, object_centre
from vlkd.world.language import QUESTION_KINDS, Question, ask_questions
from vlkd.world.scenes import Scene

FORMAT = 1
EVAL_CAPTIONS = 5
SCENE_FIELDS = (
    "image_id, file_name, background, texture, objects: [colour, shape, size, position, jitter, centre]"
)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, sort_keys=True, indent=2) + "\n", encoding="utf-8")


def write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def image_name(image_id: int) -> str:
    return f"{image_id:06d}.png"


def write_images(folder: Path, scenes: Sequence[Scene], size: int, split: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, scene in enumerate(tqdm(scenes, desc=f"drawing {split}", unit="img", disable=None)):
        draw_scene(scene, size).save(
            folder / image_name(image_id), format="PNG", optimize=False, compress_level=6
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
    record = {"image_id": image_id, "file_name": image_name(image_id), "background": scene.background}
    return record | {"texture": scene.texture, "objects": objects}


def write_scenes(path: Path, scenes: Sequence[Scene], size: int) -> None:
    rows = [json.dumps(_scene_record(i, scene, size), sort_keys=True) for i, scene in enumerate(scenes)]
    write_lines(path, rows)


def train_urls(base_url: str, count: int) -> list[str]:
    """The URLs of the first `count` training images (images/train/NNNNNN.png) on the world's server."""
    return [f"{base_url}/images/train/{image_name(i)}" for i in range(count)]


def write_urls(path: Path, urls: Sequence[str], captions: Sequence[list[str]]) -> None:
    """The training list: url, caption (the first of the row's captions), captions."""
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("captions", pa.list_(pa.string()))])
    columns = {
        "url": list(urls),
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


def coco_captions(split: str, captions: Sequence[list[str]], params: SynthParams) -> dict[str, Any]:
    size = params.image_size
    images = [
        {"id": i, "file_name": image_name(i), "width": size, "height": size} for i in range(len(captions))
    ]
    annotations = [
        {"id": image_id * EVAL_CAPTIONS + k, "image_id": image_id, "caption": caption}
        for image_id, texts in enumerate(captions)
        for k, caption in enumerate(texts)
    ]
    return {"info": _info(split, params), "licenses": [], "images": images, "annotations": annotations}


def vqa_files(
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


def add_pair(tar: tarfile.TarFile, key: str, image: Image.Image, captions: list[str]) -> None:
    """One image-text pair as img2dataset writes a sample (jpg, txt: its first caption, json:
    {"captions": [...]}), so the teacher stage reads it as it reads a downloaded corpus. JPEG as the
    web's images are; tar members with fixed metadata, so the bytes depend on the pair only."""
    data = io.BytesIO()
    image.save(data, format="JPEG", quality=95)
    add_member(tar, f"{key}.jpg", data.getvalue())
    add_member(tar, f"{key}.txt", captions[0].encode())
    add_member(tar, f"{key}.json", json.dumps({"key": key, "captions": captions}).encode())
