"""The synthetic world: shapes on backgrounds, captions, VQA with human-like answers, and a text corpus.

Everything is drawn from seeded random streams, so the same `SynthParams` give byte-identical files.
This module is the stage (`vlkd synth`): it writes the world's files in order and its manifest. The
parts, one job each: what is in an image and which scenes each part of the world draws (scenes.py),
the images (drawing.py), the words (language.py), the noise in the human answers (answers.py), the
file formats (files.py), the fine-tuning tasks (tasks.py) and the web-like noise in the training
corpus (noise.py).

Layout under the output folder (see `generate_world`):

    world.json                      manifest: params, splits, vocabulary, sha256 of every other file
    urls.parquet                    url, caption, captions (list): one row per training image, row i's
                                    url images/train/i unless noise gave the row an image of its own
    noise.parquet                   only with noise: url, noise (its kind), duplicate_of (the original's
                                    url, for duplicates) for every noisy row of urls.parquet
    images/{train,eval,shifted}/    NNNNNN.png, RGB, image_size x image_size
    images/web/                     only with noise: the noisy rows' own images (duplicates, small
                                    images), NNNNNN = the row; images/train keeps every clean image
    scenes/{train,eval,shifted}.jsonl   one JSON object per image (SCENE_FIELDS), line i = image i
    vqa/, captions/                 eval split: VQA questions/annotations and COCO captions
    tasks/                          the fine-tuning tasks, with copies of their images (vlkd/world/tasks.py)
    shifted/vqa/, shifted/captions/ the same for the domain-shifted split
    text/train.txt, text/heldout.txt    the language-model corpus, one document per line
    pretrain/NNNNN.tar              the embedded teacher's own image-text pairs, as webdataset shards
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlkd.config import SynthParams
from vlkd.io import building_folder
from vlkd.record import StageRecord
from vlkd.world.drawing import draw_scene
from vlkd.world.files import (
    EVAL_CAPTIONS,
    FORMAT,
    SCENE_FIELDS,
    add_pair,
    coco_captions,
    train_urls,
    vqa_files,
    write_images,
    write_json,
    write_lines,
    write_scenes,
    write_urls,
)
from vlkd.world.language import caption_scene, describe_scene, text_corpus
from vlkd.world.noise import NOISE_KINDS, add_noise, is_noisy
from vlkd.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    SHIFTED_BACKGROUNDS,
    SIZES,
    SPLITS,
    Scene,
    sample_scenes,
    split_scenes,
    stream,
)
from vlkd.world.server import WORLD_MANIFEST
from vlkd.world.tasks import write_tasks

logger = logging.getLogger(__name__)

PRETRAIN_FOLDER = "pretrain"
PRETRAIN_SHARD_SIZE = 1000


def _write_split(root: Path, split: str, scenes: Sequence[Scene], params: SynthParams) -> dict[str, Any]:
    """Images, scene metadata and the split's text files; returns the split's manifest entry."""
    entry: dict[str, Any] = {
        "images": f"images/{split}",
        "count": len(scenes),
        "scenes": f"scenes/{split}.jsonl",
    }
    write_images(root / entry["images"], scenes, params.image_size, split)
    write_scenes(root / entry["scenes"], scenes, params.image_size)
    rng = stream(params.seed, split, "words")
    if split == "train":
        captions = [caption_scene(scene, rng, params.captions_per_image) for scene in scenes]
        urls = train_urls(_base_url(params), len(scenes))
        entry |= {"urls": "urls.parquet", "captions_per_image": params.captions_per_image}
        if is_noisy(params):  # drawn after the clean rows, from streams of its own
            urls, captions, noise = add_noise(root, scenes, captions, _base_url(params), params)
            entry |= noise
        write_urls(root / entry["urls"], urls, captions)
        return entry
    prefix = "" if split == "eval" else f"{split}/"
    entry |= {
        "questions": f"{prefix}vqa/questions.json",
        "annotations": f"{prefix}vqa/annotations.json",
        "captions": f"{prefix}captions/annotations.json",
        "descriptions": f"{prefix}vqa/descriptions.json",
    }
    captions = [caption_scene(scene, rng, EVAL_CAPTIONS) for scene in scenes]
    write_json(root / entry["captions"], coco_captions(split, captions, params))
    # The evaluation's top rung (vlkd.evaluate.ladder): each image's true scene in words, drawn from a stream of
    # its own so that every other file stays as it was.
    words = stream(params.seed, split, "descriptions")
    write_json(root / entry["descriptions"], [{"image_id": image_id, "description": describe_scene(scene, words)}
                                              for image_id, scene in enumerate(scenes)])
    questions, annotations = vqa_files(split, scenes, rng, params)
    write_json(root / entry["questions"], questions)
    write_json(root / entry["annotations"], annotations)
    return entry | {"question_count": len(questions["questions"])}


def _write_text(root: Path, params: SynthParams) -> dict[str, Any]:
    train, heldout = text_corpus(params)
    entry = {"train": "text/train.txt", "heldout": "text/heldout.txt"}
    write_lines(root / entry["train"], train)
    write_lines(root / entry["heldout"], heldout)
    return entry | {"train_documents": len(train), "heldout_documents": len(heldout)}


def _write_pretraining(root: Path, params: SynthParams) -> dict[str, Any]:
    """The teacher's pretraining pairs as webdataset shards of `PRETRAIN_SHARD_SIZE` samples, each as
    img2dataset writes one (`add_pair`), so the shards' bytes depend on the params only."""
    entry = {"shards": PRETRAIN_FOLDER, "count": params.pretrain_images, "shard_size": PRETRAIN_SHARD_SIZE}
    if not params.pretrain_images:
        return entry | {"shard_count": 0}
    scenes = sample_scenes(params.seed, "pretrain", params.pretrain_images)
    rng = stream(params.seed, "pretrain", "words")
    folder = root / PRETRAIN_FOLDER
    folder.mkdir(parents=True)
    starts = range(0, len(scenes), PRETRAIN_SHARD_SIZE)
    for shard, start in enumerate(tqdm(starts, desc="drawing pretraining shards", unit="shard", disable=None)):
        with tarfile.open(folder / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, min(start + PRETRAIN_SHARD_SIZE, len(scenes))):
                captions = caption_scene(scenes[index], rng, params.captions_per_image)
                add_pair(tar, f"{index:09d}", draw_scene(scenes[index], params.image_size), captions)
    return entry | {"shard_count": len(starts)}


def _base_url(params: SynthParams) -> str:
    return f"http://127.0.0.1:{params.port}"


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() != WORLD_MANIFEST
    }


def _clean_defaults(params: SynthParams) -> set[str]:
    """The params a clean world's manifest leaves out: the noise shares, all 0, so that the world is byte
    for byte the one made before they existed (a DVC-tracked output the recorded pipeline starts from)."""
    return set() if is_noisy(params) else set(NOISE_KINDS.values())


def _manifest(
    root: Path, params: SynthParams, splits: dict[str, Any], text: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "seed": params.seed,
        "params": params.model_dump(mode="json", exclude={"output"} | _clean_defaults(params)),
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
    scenes = split_scenes(params)
    splits = {split: _write_split(root, split, scenes[split], params) for split in SPLITS}
    text = _write_text(root, params)
    pretrain = _write_pretraining(root, params)
    tasks = write_tasks(root, scenes, params)  # copies the splits' images and VQA files: written last
    manifest = _manifest(root, params, splits, text) | {"tasks": tasks, "pretrain": pretrain}
    write_json(root / WORLD_MANIFEST, manifest)
    return manifest


def generate_world(output: Path, params: SynthParams) -> dict[str, Any]:
    """Write the synthetic world into `output` (params.output is ignored) and return its manifest,
    which is also `output/world.json`. Built whole, then swapped in (`building_folder`); a world whose
    record (`vlkd.record`: the params and the code) matches is kept as it is."""
    record = StageRecord.of("synth", __name__, params, {}, Path(output) / WORLD_MANIFEST)
    if record.reusable(Path(output)):
        logger.info("synthetic world in %s is up to date with its record; not written again", output)
        return json.loads((Path(output) / WORLD_MANIFEST).read_text())
    with building_folder(Path(output), WORLD_MANIFEST, "synthetic world", "synth.output") as building:
        manifest = _build(building, params)
        record.write(building)
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
