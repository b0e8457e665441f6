"""Zero-shot retrieval between a teacher's held-out images and their captions (COCO captions format):
the teacher stage's metric, comparable between the embedded teacher and a pretrained CLIP."""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from vlkd.errors import VlkdError
from vlkd.models.teacher import Teacher
from vlkd.training import autocast, resolve_precision

log = logging.getLogger(__name__)


def read_coco_captions(path: Path, images_dir: Path) -> tuple[list[Path], list[set[str]], list[str]]:
    """(image files, each image's set of caption texts, the images that are missing) of a COCO captions
    file; an image without captions or without its file is left out."""
    try:
        coco = json.loads(path.read_text())
        texts: dict[int, set[str]] = defaultdict(set)
        for annotation in coco["annotations"]:
            texts[annotation["image_id"]].add(" ".join(str(annotation["caption"]).split()))
        files = {image["id"]: image["file_name"] for image in coco["images"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VlkdError(f"{path} is not a COCO captions file ({type(err).__name__}: {err}); check "
                        "teacher.eval_captions") from err
    paths, captions, missing = [], [], []
    for image_id, file_name in sorted(files.items()):
        if not texts.get(image_id):
            continue
        if not (images_dir / file_name).is_file():
            missing.append(file_name)
            continue
        paths.append(images_dir / file_name)
        captions.append(texts[image_id])
    return paths, captions, missing



@torch.no_grad()
def evaluate_retrieval(teacher: Teacher, images_dir: Path, captions_file: Path, device: torch.device | str = "cpu",
                       batch_size: int = 256) -> dict:
    """Zero-shot retrieval between the held-out images and the distinct texts of their captions.

    A hit is judged by text: captions are templated, so two images can share a caption text, and
    retrieving that text is right for both. image->text: the top-ranked texts hold one of the image's
    own; text->image: the top-ranked image has the text among its captions. Chance: the expected
    recall of a random ranking."""
    if not captions_file.is_file() or not images_dir.is_dir():
        missing = captions_file if not captions_file.is_file() else images_dir
        log.warning("retrieval not measured: %s does not exist (set teacher.eval_images / eval_captions)", missing)
        return {"skipped": f"{missing} does not exist"}
    paths, own, missing = read_coco_captions(captions_file, images_dir)
    if missing:
        log.warning("%d eval image(s) in %s are missing, e.g. %s; left out", len(missing), images_dir, missing[0])
    if not paths:
        log.warning("retrieval not measured: no eval image of %s found in %s", captions_file, images_dir)
        return {"skipped": f"no eval image of {captions_file} found in {images_dir}"}
    texts = sorted(set().union(*own))
    device = torch.device(device)
    model = teacher.model.to(device).eval()
    image_features, text_features = [], []
    with autocast(device, resolve_precision("auto", device)):
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([_load_eval_image(path, teacher.preprocess)
                                 for path in paths[start:start + batch_size]])
            image_features.append(_first(model.encode_image(batch.to(device))).float())
        for start in range(0, len(texts), batch_size):
            batch = teacher.tokenizer(texts[start:start + batch_size]).to(device)
            text_features.append(model.encode_text(batch).float())
    images = torch.nn.functional.normalize(torch.cat(image_features), dim=-1)
    words = torch.nn.functional.normalize(torch.cat(text_features), dim=-1)
    similarity = (images @ words.T).cpu()
    column = {text: j for j, text in enumerate(texts)}
    relevant = torch.zeros(len(paths), len(texts), dtype=torch.bool)  # [images, texts]
    for i, mine in enumerate(own):
        relevant[i, [column[text] for text in mine]] = True
    return {
        "images": len(paths),
        "texts": len(texts),
        "captions_file": str(captions_file),
        "missing_images": len(missing),
        "image_to_text": _recalls(similarity, relevant, (1, 5)),
        "text_to_image": _recalls(similarity.T, relevant.T, (1, 5)),
    }



def _first(output):
    return output[0] if isinstance(output, tuple | list) else output



def _load_eval_image(path: Path, preprocess) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return preprocess(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise VlkdError(f"eval image {path} does not decode ({err}); regenerate the world or fix the file") from err



def _recalls(similarity: torch.Tensor, relevant: torch.Tensor, ks: tuple[int, ...]) -> dict:
    """Recall@k of ranking the columns for every row, and its chance level: the probability that k
    columns drawn at random hold at least one relevant one."""
    result = {"queries": similarity.shape[0], "gallery": similarity.shape[1]}
    n = similarity.shape[1]
    ranked = similarity.topk(min(max(ks), n), dim=1).indices
    counts = relevant.sum(dim=1).tolist()
    for k in ks:
        k_eff = min(k, n)
        hits = relevant.gather(1, ranked[:, :k_eff]).any(dim=1).float().mean().item()
        chance = sum(1 - _none_relevant(n, count, k_eff) for count in counts) / len(counts)
        result[f"recall@{k}"] = round(hits, 4)
        result[f"chance@{k}"] = round(chance, 4)
    return result



def _none_relevant(n: int, relevant: int, k: int) -> float:
    """Probability that k of n items drawn without replacement miss all `relevant` ones."""
    return math.comb(n - relevant, k) / math.comb(n, k) if n - relevant >= k else 0.0
