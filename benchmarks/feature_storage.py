"""Disk per image of the feature files, by teacher and token layout, and what that makes for a corpus.

    .venv/bin/python benchmarks/feature_storage.py [--images 256] [--grids 1 2 4] [--features data/features]

For each teacher (open_clip's ViT-B-32, ViT-B-16 and ViT-L-14, and the embedded vlkd-tiny-resnet) and
each layout (pooled embeddings only; every image token; the tokens pooled to G x G by
`load_teacher(..., token_grid=G)`):
  computed   tokens x width x 2 bytes + the two float16 embeddings (embed_dim x 2 bytes each)
  random     the size of a real Parquet file written by the features stage's own ShardWriter (the same
             schema, Arrow types and writer options), per image, for --images images of random features:
             unit-norm Gaussian embeddings and N(0, 1) tokens, with a key and a caption of typical length
  real       the same for the embedded teacher's real features (--features, the recorded run's), re-written
             per layout (pooled to a grid from the stored float16 tokens)
and the disk of CC3M (3.3M images) and a LAION-400M-sized corpus at the measured size (real where there
is one). Token shapes come from a forward pass of each tower created with random weights (none can be
downloaded here and none are needed), checked against open_clip's config; `--shapes config` reads them
from the config alone. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlkd.data.feature_schema import feature_schema  # noqa: E402
from vlkd.data.feature_writer import ShardWriter  # noqa: E402
from vlkd.models.teacher import EMBEDDED_CONFIG, EMBEDDED_MODEL, pool_token_grid, token_grid_size  # noqa: E402

CORPORA = {"CC3M": 3_300_000, "LAION-400M": 400_000_000}
VIT_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
# CC3M's captions average about 10 words; the key is img2dataset's 9-digit one.
CAPTION = "a photograph of a small dog sitting on a wooden bench in the park"


@dataclass(frozen=True)
class Shapes:
    embed_dim: int
    grid: tuple[int, int]  # the spatial grid of the image tokens
    leading: int  # non-grid tokens before it (the ResNet's pooled token)
    width: int

    def tokens(self, token_grid: int | None) -> int:
        return self.leading + (self.grid[0] * self.grid[1] if token_grid is None else token_grid ** 2)


def config_shapes(name: str) -> Shapes:
    config = open_clip.get_model_config(name)
    vision = config["vision_cfg"]
    if isinstance(vision["layers"], list | tuple):  # ModifiedResNet: cells of the 32x-downsampled map, embed space
        side = vision["image_size"] // 32
        return Shapes(config["embed_dim"], (side, side), 1, config["embed_dim"])
    side = vision["image_size"] // vision["patch_size"]
    return Shapes(config["embed_dim"], (side, side), 0, vision["width"])


@torch.no_grad()
def forward_shapes(name: str) -> Shapes:
    """The shapes a tower really returns: one forward pass with image tokens on, random weights."""
    from open_clip.modified_resnet import ModifiedResNet

    from vlkd.models.teacher import _with_cell_tokens

    model = open_clip.create_model(name, pretrained=None).eval()
    if isinstance(model.visual, ModifiedResNet):
        model.visual.attnpool.register_forward_hook(_with_cell_tokens)  # what load_teacher(image_tokens=True) adds
    else:
        model.visual.output_tokens = True
    side = model.visual.image_size
    side = side[0] if isinstance(side, tuple | list) else side
    pooled, tokens = model.encode_image(torch.zeros(1, 3, side, side))
    grid = token_grid_size(model.visual)
    shapes = Shapes(pooled.shape[1], grid, tokens.shape[1] - grid[0] * grid[1], tokens.shape[2])
    if shapes != config_shapes(name):
        raise SystemExit(f"{name}: the forward pass gives {shapes}, the config {config_shapes(name)}")
    return shapes


def computed_bytes(shapes: Shapes, tokens: int | None) -> int:
    return 2 * shapes.embed_dim * 2 + (tokens * shapes.width * 2 if tokens is not None else 0)


def write_file(path: Path, image: np.ndarray, text: np.ndarray, tokens: np.ndarray | None,
               keys: list[str], captions: list[str], all_captions: list[tuple[str, ...]],
               batch: int = 256) -> tuple[float, float | None]:
    """Bytes per image of a feature file written as the features stage writes one (a row group per batch), and
    the token column's bytes on disk over its float16 bytes (below 1: Parquet's encodings found redundancy)."""
    token_shape = tuple(tokens.shape[1:]) if tokens is not None else None
    writer = ShardWriter(path, feature_schema(image.shape[1], token_shape, {"benchmark": "feature_storage"}))
    for start in range(0, len(keys), batch):
        part = slice(start, start + batch)
        writer.write(keys[part], captions[part], all_captions[part], image[part], text[part],
                     tokens[part] if tokens is not None else None)
    writer.commit([])
    size = path.stat().st_size
    metadata = pq.ParquetFile(path).metadata
    stored = sum(group.column(i).total_compressed_size for group in (metadata.row_group(r) for r in
                 range(metadata.num_row_groups)) for i in range(group.num_columns)
                 if group.column(i).path_in_schema.startswith("image_tokens"))
    path.unlink()
    return size / len(keys), stored / tokens.nbytes * 2 if tokens is not None else None  # float32 in hand


def unit(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    values = rng.standard_normal((rows, dim), dtype=np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def random_bytes(shapes: Shapes, token_grid: int | None, with_tokens: bool, images: int,
                 folder: Path) -> tuple[float, float | None]:
    rng = np.random.default_rng(0)
    tokens = (rng.standard_normal((images, shapes.tokens(token_grid), shapes.width), dtype=np.float32)
              if with_tokens else None)
    keys = [f"{i:09d}" for i in range(images)]
    return write_file(folder / "random.parquet", unit(images, shapes.embed_dim, rng),
                      unit(images, shapes.embed_dim, rng), tokens, keys, [CAPTION] * images, [(CAPTION,)] * images)


def real_bytes(features: Path, shapes: Shapes, token_grid: int | None, with_tokens: bool,
               folder: Path) -> tuple[float, float | None]:
    """The first feature file of the recorded run, re-written in the layout (pooled from its float16 tokens)."""
    table = pq.read_table(sorted(features.glob("[0-9]*.parquet"))[0])
    image, text = (np.stack(table[name].to_numpy(zero_copy_only=False)) for name in ("image_embedding",
                                                                                  "text_embedding"))
    tokens = None
    if with_tokens:
        stored = torch.from_numpy(np.array(table["image_tokens"].to_pylist(), dtype=np.float32))
        if stored.shape[1] != shapes.tokens(None):
            raise SystemExit(f"{features} holds {stored.shape[1]} tokens per image, not {shapes.tokens(None)}: "
                             "pass --features of the embedded teacher at its recorded image size")
        tokens = (stored if token_grid is None else pool_token_grid(stored, shapes.grid, token_grid)).numpy()
    return write_file(folder / "real.parquet", image, text, tokens, table["key"].to_pylist(),
                      table["caption"].to_pylist(), [tuple(texts) for texts in table["captions"].to_pylist()])


def human(size: float) -> str:
    for suffix, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.3g} {suffix}"
    return f"{size / 1e3:.3g} kB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images of random features per file")
    parser.add_argument("--grids", type=int, nargs="+", default=[1, 2, 4], help="token_grid values to measure")
    parser.add_argument("--features", type=Path, default=Path("data/features"),
                        help="the embedded teacher's real feature files (skipped if absent)")
    parser.add_argument("--shapes", choices=["forward", "config"], default="forward")
    args = parser.parse_args()

    open_clip.add_model_config(write_embedded_config(Path(tempfile.mkdtemp())))
    real = args.features if any(args.features.glob("[0-9]*.parquet")) else None
    lines = ["| teacher | layout | tokens x width | computed B/image | random B/image | real B/image | "
             "tokens on disk / float16 (random, real) | " + " | ".join(CORPORA) + " |",
             "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(CORPORA)]
    with tempfile.TemporaryDirectory() as tmp:
        for name in (*VIT_MODELS, EMBEDDED_MODEL):
            shapes = forward_shapes(name) if args.shapes == "forward" else config_shapes(name)
            layouts = [("pooled only", None, False), ("all tokens", None, True)]
            layouts += [(f"token_grid {g}", g, True) for g in args.grids if g < min(shapes.grid)]
            for layout, grid, with_tokens in layouts:
                count = shapes.tokens(grid) if with_tokens else None
                computed = computed_bytes(shapes, count)
                measured, random_ratio = random_bytes(shapes, grid, with_tokens, args.images, Path(tmp))
                real_size, real_ratio = (real_bytes(real, shapes, grid, with_tokens, Path(tmp))
                                         if real is not None and name == EMBEDDED_MODEL else (None, None))
                disk = real_size if real_size is not None else measured
                ratios = ", ".join(f"{ratio:.3f}" for ratio in (random_ratio, real_ratio) if ratio is not None)
                lines.append(f"| {name} | {layout} | {f'{count} x {shapes.width}' if count else '-'} | {computed:,} | "
                             f"{measured:,.0f} | {f'{real_size:,.0f}' if real_size is not None else '-'} | "
                             f"{ratios or '-'} | " + " | ".join(human(disk * images) for images in CORPORA.values())
                             + " |")
                print(lines[-1], file=sys.stderr, flush=True)
    print(f"{platform.machine()}, {os.cpu_count()} CPU(s), python {platform.python_version()}, "
          f"open_clip {open_clip.__version__}, {args.images} random images per file"
          + (f", real: {real}" if real else ""))
    print("\n".join(lines))


def write_embedded_config(folder: Path) -> Path:
    """The embedded teacher's architecture as open_clip reads a config (its file name is the model name)."""
    path = folder / f"{EMBEDDED_MODEL}.json"
    path.write_text(json.dumps(EMBEDDED_CONFIG))
    return path


if __name__ == "__main__":
    main()
