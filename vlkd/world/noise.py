"""Web-like noise in the world's training corpus (urls.parquet and the images it points to), so a filter
can be measured on a world as noisy as the web is (SynthParams' noise shares; all 0: no noise, and
nothing here runs).

Noisy rows replace clean rows, so the list keeps `images` rows. Which rows are noisy is a seeded sample of
the rows (stream train/noise-rows), dealt to the kinds in NOISE_KINDS' order; each kind then draws from
a stream of its own (train/noise-<kind>), row by row in row order. The clean rows' draws (scenes,
captions) come from streams noise never touches, so a noisy world's clean rows are the clean world's.

Row i, if noisy, becomes:
- mismatched_caption: its own image, with every caption of another training image j whose objects share
  no colour-shape pair with image i's (alt-text scraped from the wrong element);
- near_duplicate: `images/web/NNNNNN.{jpg,png}`, a clean row k's image re-encoded as a JPEG of quality
  30-70, cropped by 1 to side/16 pixels on each side, shifted by 2-5 pixels each way (the edges
  repeated) or resized to 60-85% or 120-160% of its side (a re-upload); k's own captions or new captions
  of k's scene, even odds;
- exact_duplicate: `images/web/NNNNNN.png`, a copy of clean row k's PNG byte for byte (a mirror, a CDN
  copy); captions as a near-duplicate's;
- boilerplate_caption: its own image, every caption a seeded choice from BOILERPLATE;
- small_image: `images/web/NNNNNN.png`, its own image as a thumbnail 16-32 pixels square (at most half
  the world's side) or squashed to an aspect ratio of 3:1 to 5:1, either way up; its own captions.
Duplicates copy clean rows only, so `duplicate_of` always names a row without noise of its own.

The clean images stay where they are (`images/train/`: the tasks copy them, and scenes/train.jsonl line
i describes images/train/i), so an image that noise took out of the list is still served, in no row.
`noise.parquet` names every noisy row: url, noise (its kind), duplicate_of (the original's url, for
duplicates; else null).
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlkd.config import SynthParams
from vlkd.errors import VlkdError
from vlkd.world.files import image_name, train_urls
from vlkd.world.language import caption_scene
from vlkd.world.scenes import Scene, stream

# A noisy row's kind (noise.parquet's `noise`) -> its share in SynthParams.
NOISE_KINDS = {
    "mismatched_caption": "mismatched_captions",
    "near_duplicate": "near_duplicates",
    "exact_duplicate": "exact_duplicates",
    "boilerplate_caption": "boilerplate_captions",
    "small_image": "small_images",
}
NOISE_FILE = "noise.parquet"
TRAIN_IMAGES = "images/train"
WEB_IMAGES = "images/web"
# Alt-text that says nothing about the image; `{n}` is a seeded number (file names, numbered untitled).
BOILERPLATE = (
    "image", "photo", "picture", "stock photo", "stock image", "untitled", "untitled-{n}", "IMG_{n:04d}.jpg",
    "DSC_{n:04d}.JPG", "image{n}.png", "click to enlarge", "click here to enlarge", "view full size",
    "thumbnail", "no description available", "placeholder", "download", "screenshot", "banner", "photo {n}",
)
NEAR_DUPLICATES = ("jpeg", "crop", "shift", "resize")
_NOISE_SCHEMA = pa.schema([("url", pa.string()), ("noise", pa.string()), ("duplicate_of", pa.string())])


def is_noisy(params: SynthParams) -> bool:
    """Whether any noise share is above 0 (then the world has a noise.parquet)."""
    return any(getattr(params, share) for share in NOISE_KINDS.values())


def noise_counts(params: SynthParams) -> dict[str, int]:
    """Rows of each kind: its share of `images`, rounded."""
    return {kind: round(getattr(params, share) * params.images) for kind, share in NOISE_KINDS.items()}


def add_noise(
    root: Path, scenes: Sequence[Scene], captions: Sequence[list[str]], base_url: str, params: SynthParams
) -> tuple[list[str], list[list[str]], dict[str, Any]]:
    """(urls, captions) of the training list, `captions` (every row's, drawn clean) with noisy rows in
    place of some, and the train split's manifest entries. Writes the noisy rows' own images under
    `root/images/web` (`root/images/train` must hold the clean ones) and `root/noise.parquet`."""
    counts = noise_counts(params)
    kinds = _noisy_rows(params, counts)
    clean = [index for index in range(len(scenes)) if index not in kinds]
    urls, captions = train_urls(base_url, len(scenes)), [list(texts) for texts in captions]
    duplicate_of: dict[int, int] = {}
    for kind in NOISE_KINDS:
        rng = stream(params.seed, "train", f"noise-{kind}")
        for index in sorted(i for i, k in kinds.items() if k == kind):
            own: tuple[bytes, str] | None = None  # the row's own image file: (bytes, extension)
            if kind == "mismatched_caption":
                captions[index] = list(captions[_other_objects(index, scenes, rng)])
            elif kind == "boilerplate_caption":
                captions[index] = [_boilerplate(rng) for _ in range(params.captions_per_image)]
            elif kind == "small_image":
                own = _png(_small(_clean_image(root, index), rng)), "png"
            else:
                original = duplicate_of[index] = rng.choice(clean)
                captions[index] = _duplicate_captions(scenes[original], captions[original], rng,
                                                      params.captions_per_image)
                if kind == "exact_duplicate":
                    own = (root / TRAIN_IMAGES / image_name(original)).read_bytes(), "png"
                else:
                    own = _near_duplicate(_clean_image(root, original), rng)
            if own is not None:
                name = f"{WEB_IMAGES}/{index:06d}.{own[1]}"
                (root / WEB_IMAGES).mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(own[0])
                urls[index] = f"{base_url}/{name}"
    noisy = sorted(kinds)
    rows = {
        "url": [urls[index] for index in noisy],
        "noise": [kinds[index] for index in noisy],
        "duplicate_of": [urls[duplicate_of[index]] if index in duplicate_of else None for index in noisy],
    }
    pq.write_table(pa.Table.from_pydict(rows, schema=_NOISE_SCHEMA), root / NOISE_FILE, compression="snappy")
    return urls, captions, {"noise": NOISE_FILE, "noise_rows": counts, "web_images": WEB_IMAGES}


def _clean_image(root: Path, index: int) -> Image.Image:
    with Image.open(root / TRAIN_IMAGES / image_name(index)) as image:
        return image.convert("RGB")


def _noisy_rows(params: SynthParams, counts: dict[str, int]) -> dict[int, str]:
    """Row index -> kind for every noisy row."""
    total = sum(counts.values())
    if total >= params.images:
        raise VlkdError(f"the noise shares make {total} of the {params.images} training rows noisy and leave "
                        "none clean; lower the shares or raise synth.images")
    chosen = stream(params.seed, "train", "noise-rows").sample(range(params.images), total)
    kinds, start = {}, 0
    for kind, count in counts.items():
        kinds.update(dict.fromkeys(chosen[start : start + count], kind))
        start += count
    return kinds


def _other_objects(index: int, scenes: Sequence[Scene], rng: random.Random) -> int:
    """Another training image whose objects share no colour-shape pair with image `index`'s."""
    pairs = {obj.pair for obj in scenes[index].objects}
    for _ in range(1000):
        other = rng.randrange(len(scenes))
        if not pairs & {obj.pair for obj in scenes[other].objects}:
            return other
    raise VlkdError(f"no training image shows objects other than image {index}'s for its mismatched caption; "
                    "raise synth.images or lower synth.mismatched_captions")


def _boilerplate(rng: random.Random) -> str:
    return rng.choice(BOILERPLATE).format(n=rng.randint(1, 9999))


def _duplicate_captions(scene: Scene, own: list[str], rng: random.Random, count: int) -> list[str]:
    """The original's own captions, or new captions of its scene (a re-upload's own alt-text)."""
    return list(own) if rng.random() < 0.5 else caption_scene(scene, rng, count)


def _png(image: Image.Image) -> bytes:
    """PNG bytes, as files.write_images saves the clean images."""
    data = io.BytesIO()
    image.save(data, format="PNG", optimize=False, compress_level=6)
    return data.getvalue()


def _near_duplicate(image: Image.Image, rng: random.Random) -> tuple[bytes, str]:
    """(file bytes, extension) of a re-upload of `image`: never byte-equal, close in pixels."""
    variant = rng.choice(NEAR_DUPLICATES)
    width, height = image.size
    if variant == "jpeg":
        data = io.BytesIO()
        image.save(data, format="JPEG", quality=rng.randint(30, 70))
        return data.getvalue(), "jpg"
    if variant == "crop":
        most = max(2, min(width, height) // 16)
        left, top, right, bottom = (rng.randint(1, most) for _ in range(4))
        image = image.crop((left, top, width - right, height - bottom))
    elif variant == "shift":  # content moved by (dx, dy), the edge pixels repeated into the gap
        dx, dy = (rng.choice((-1, 1)) * rng.randint(2, 5) for _ in range(2))
        padded = np.pad(np.asarray(image), ((abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode="edge")
        top, left = abs(dy) - dy, abs(dx) - dx
        image = Image.fromarray(padded[top : top + height, left : left + width])
    else:
        factor = rng.uniform(0.6, 0.85) if rng.random() < 0.5 else rng.uniform(1.2, 1.6)
        image = image.resize((round(width * factor), round(height * factor)), Image.Resampling.LANCZOS)
    return _png(image), "png"


def _small(image: Image.Image, rng: random.Random) -> Image.Image:
    """A thumbnail of `image` (16-32 pixels square, at most half its side), or `image` squashed to an
    aspect ratio of 3:1 to 5:1, either way up."""
    side = min(image.size)
    if rng.random() < 0.5:
        thumb = min(rng.randint(16, 32), side // 2)
        return image.resize((thumb, thumb), Image.Resampling.BOX)
    short = max(1, round(side / rng.uniform(3, 5)))
    return image.resize((side, short) if rng.random() < 0.5 else (short, side), Image.Resampling.LANCZOS)
