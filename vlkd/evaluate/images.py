"""Teacher features of a benchmark's images, through the features stage's own code and format.

The images of a benchmark (a folder, named by `image_pattern`) are packed once, with one blank image for
the blank-image control, into a cache folder named after their content (`vlkd.data.image_features`); a new
student is evaluated without running the teacher again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vlkd.config import BenchmarkSpec
from vlkd.data.image_features import embed_images
from vlkd.errors import VlkdError
from vlkd.evaluate.ladder import read_references
from vlkd.models.teacher import Teacher
from vlkd.record import fingerprint

log = logging.getLogger(__name__)


def image_features(spec: BenchmarkSpec, image_ids: list[int], teacher: Teacher, cache: Path,
                   patch: bool, device: str) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({image id: features}, blank-image features): pooled embeddings [E], or patch tokens [T, W]."""
    files = {image_id: spec.images / spec.image_pattern.format(image_id=image_id) for image_id in image_ids}
    missing = [path for path in files.values() if not path.is_file()]
    if missing:
        raise VlkdError(f"{len(missing)} evaluation image(s) missing, e.g. {missing[0]}; check the benchmark's "
                        "images folder and image_pattern in params.yaml")
    folder = cache / _content_key(files)
    by_key, blank, undecodable = embed_images({str(image_id): path for image_id, path in files.items()}, teacher,
                                              folder, patch, device, blank=True)
    if undecodable:
        first = next(iter(undecodable))
        log.warning("%d evaluation image(s) could not be decoded and are left out, e.g. image %s (%s)",
                    len(undecodable), first, undecodable[first])
    return {image_id: by_key[str(image_id)] for image_id in image_ids if str(image_id) in by_key}, blank


@torch.inference_mode()
def caption_features(captions: Path, image_ids: list[int], teacher: Teacher) -> tuple[dict[int, torch.Tensor],
                                                                                      torch.Tensor]:
    """For a student distilled with `aligned_teacher` (a diagnostic): the teacher's normalised text embedding of
    each image's first reference caption (COCO caption annotations) in place of its image embedding, and of an
    empty caption for the blank control. Images without a caption are left out, as undecodable ones are."""
    references = read_references(captions)
    kept = [image_id for image_id in image_ids if references.get(image_id)]
    if len(kept) < len(image_ids):
        log.warning("%d evaluation image(s) have no caption in %s and are left out", len(image_ids) - len(kept),
                    captions)
    model = teacher.model
    texts = [references[image_id][0] for image_id in kept] + [""]
    run_on = next(model.parameters()).device
    embedded = torch.cat([model.encode_text(teacher.tokenizer(texts[begin:begin + 256]).to(run_on)).float()
                          for begin in range(0, len(texts), 256)])
    embedded = torch.nn.functional.normalize(embedded, dim=-1).cpu()
    return dict(zip(kept, embedded[:-1], strict=True)), embedded[-1]


def _content_key(files: dict[int, Path]) -> str:
    """Names the cache entry after what is in it: image ids, file names, sizes and modification times."""
    record = [(image_id, str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
              for image_id, path in sorted(files.items())]
    return fingerprint(record)[:16]
