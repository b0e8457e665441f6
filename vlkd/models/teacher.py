"""The frozen CLIP teacher: loading through open_clip's own factory, and its fingerprint.

A teacher is named the way open_clip names models: an architecture plus a pretrained tag
(`ViT-L-14` / `openai`) or a local checkpoint file. A checkpoint may carry its architecture's config
next to it as `<model>.json` (the teacher stage writes one for the embedded model); it is registered
with open_clip before loading, so `create_model_and_transforms(model, pretrained=<file>)` works.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from open_clip.transformer import VisionTransformer

from vlkd.errors import VlkdError
from vlkd.io import project_root, sha256_file, tmp_path_for, write_json_atomic

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")
CHECKPOINT_NAME = "open_clip_model.safetensors"  # the name open_clip's `local-dir:` loader looks for first

# The embedded teacher: open_clip's ModifiedResNet (the architecture of CLIP RN50) at toy size, which trains on
# the synthetic world in minutes on a CPU and, unlike a ViT of the same cost, learns the shapes and positions the
# world's questions ask about (linear probes: docs/experiments.md, "The embedded teacher").
EMBEDDED_MODEL = "vlkd-tiny-resnet"
EMBEDDED_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}


@dataclass(frozen=True)
class Fingerprint:
    """What makes two teachers produce the same features. Paths are left out on purpose: moving a
    checkpoint must not invalidate features made with it."""

    model: str
    weights_sha256: str
    open_clip_version: str
    # The image tokens' spatial grid pooled to token_grid x token_grid; None: the model's own grid. Part of the
    # fingerprint because features of two grids must never meet in one folder or one student.
    token_grid: int | None = None

    def as_dict(self) -> dict[str, str | int]:
        fingerprint: dict[str, str | int] = {"model": self.model, "weights_sha256": self.weights_sha256,
                                             "open_clip_version": self.open_clip_version}
        if self.token_grid is not None:  # absent, not null: feature files and students made before keep matching
            fingerprint["token_grid"] = self.token_grid
        return fingerprint


@dataclass
class Teacher:
    model: torch.nn.Module
    preprocess: Callable  # open_clip's evaluation transform: PIL image -> tensor
    tokenizer: Callable  # list[str] -> LongTensor [n, context_length]
    fingerprint: Fingerprint
    embed_dim: int
    image_size: int

    @property
    def preprocess_description(self) -> str:
        return " ".join(repr(self.preprocess).split())


def save_checkpoint(model: torch.nn.Module, model_name: str, model_config: dict, folder: Path) -> Path:
    """Write weights and config so that both `create_model_and_transforms(model_name, pretrained=<file>)`
    (through load_teacher) and `create_model_and_transforms("local-dir:<folder>")` load them."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    hf_config = {"model_cfg": model_config, "preprocess_cfg": dict(model.visual.preprocess_cfg)}
    write_json_atomic(folder / f"{model_name}.json", model_config)
    write_json_atomic(folder / "open_clip_config.json", hf_config)
    checkpoint = folder / CHECKPOINT_NAME
    tmp = tmp_path_for(checkpoint)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(tmp))
    tmp.replace(checkpoint)
    return checkpoint


def is_checkpoint_file(pretrained: str) -> bool:
    return Path(pretrained).suffix in CHECKPOINT_SUFFIXES or Path(pretrained).exists()


def load_teacher(model_name: str, pretrained: str, device: str | torch.device = "cpu",
                 image_tokens: bool = False, token_grid: int | None = None) -> Teacher:
    """The frozen teacher in eval mode; with `image_tokens`, encode_image also returns image tokens.

    `token_grid` G average-pools the tokens' spatial grid (ViT patches, ResNet cells) to G x G, keeping a
    leading non-grid token (the ResNet's pooled one) first: a ViT then gives G*G tokens instead of one per
    patch, the ResNet 1 + G*G. It is part of the fingerprint whether or not this load returns tokens, so
    that a teacher loaded for pooled embeddings only (evaluating a `prefix: pooled` student) still matches
    the feature files made with the grid. G equal to the model's grid is its own layout: None."""
    if token_grid is not None and (isinstance(token_grid, bool) or not isinstance(token_grid, int)
                                   or token_grid < 1):
        raise VlkdError(f"token_grid must be a whole number of at least 1 (or null for every token), "
                        f"not {token_grid!r}")
    weights = _register_and_locate(model_name, pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                     device=device)
    except (RuntimeError, AssertionError, KeyError) as err:  # missing keys, size or embedding mismatches
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        first = lines[1] if len(lines) > 1 else lines[0]
        raise VlkdError(f"checkpoint {pretrained} does not match model {model_name!r} ({first[:200]}); "
                        "pass the --model the checkpoint was trained with") from err
    if weights is None:  # a pretrained tag: open_clip downloaded (or found cached) the file
        weights = Path(open_clip.pretrained.download_pretrained(
            open_clip.get_pretrained_cfg(model_name, pretrained)))
    model.eval().requires_grad_(False)
    token_grid = _check_token_grid(model.visual, model_name, token_grid)
    if image_tokens:
        if isinstance(model.visual, ModifiedResNet):
            model.visual.attnpool.register_forward_hook(functools.partial(_with_cell_tokens, token_grid=token_grid))
        elif hasattr(model.visual, "output_tokens"):
            model.visual.output_tokens = True
            if token_grid is not None:
                grid = model.visual.grid_size
                model.visual.register_forward_hook(
                    lambda _, __, out: (out[0], pool_token_grid(out[1], grid, token_grid)))
        else:
            raise VlkdError(f"model {model_name!r} has no image tokens (ViT and ModifiedResNet towers do); "
                            "set features.image_tokens: false")
    size = model.visual.image_size
    return Teacher(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(model_name),
        fingerprint=Fingerprint(model_name, sha256_file(weights), open_clip.__version__, token_grid),
        embed_dim=open_clip.get_model_config(model_name)["embed_dim"],
        image_size=size[0] if isinstance(size, tuple | list) else size,
    )


def token_grid_size(visual: torch.nn.Module) -> tuple[int, int] | None:
    """(rows, columns) of the image tokens' spatial grid, or None for a tower whose tokens are no grid."""
    if isinstance(visual, ModifiedResNet):
        side = visual.attnpool.positional_embedding.shape[0] - 1  # one position per cell, after the pooled one
        return (round(side ** 0.5),) * 2
    # An attentional pool (CoCa) returns learnt queries, not patches: nothing spatial to pool.
    if isinstance(visual, VisionTransformer) and visual.attn_pool is None:
        return tuple(visual.grid_size)
    return None


def _check_token_grid(visual: torch.nn.Module, model_name: str, token_grid: int | None) -> int | None:
    """token_grid as the fingerprint records it: None when it is the model's own grid (the same features)."""
    if token_grid is None:
        return None
    grid = token_grid_size(visual)
    if grid is None:
        raise VlkdError(f"model {model_name!r} has no spatial grid of image tokens to pool; set token_grid: null")
    if token_grid > min(grid):
        raise VlkdError(f"token_grid {token_grid} is larger than the {grid[0]} x {grid[1]} grid of image tokens "
                        f"of model {model_name!r}; pooling can only shrink it")
    return None if grid == (token_grid, token_grid) else token_grid


def pool_token_grid(tokens: torch.Tensor, grid: tuple[int, int], token_grid: int) -> torch.Tensor:
    """[N, leading + rows*columns, W] tokens, grid row-major after `leading` (0 or 1) non-grid tokens, to
    [N, leading + token_grid**2, W]: each output token the mean of its block of the grid (adaptive average
    pooling, so blocks overlap when the grid does not divide), the leading token kept first as it is."""
    rows, columns = grid
    leading = tokens.shape[1] - rows * columns
    if leading not in (0, 1):
        raise VlkdError(f"{tokens.shape[1]} image tokens are not a {rows} x {columns} grid (plus at most one "
                        "pooled token); token_grid cannot pool them")
    cells = tokens[:, leading:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, columns)
    pooled = F.adaptive_avg_pool2d(cells, token_grid).flatten(2).transpose(1, 2)
    return torch.cat([tokens[:, :leading], pooled], 1)


def _with_cell_tokens(pool: AttentionPool2d, inputs: tuple[torch.Tensor], pooled: torch.Tensor,
                      token_grid: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward hook on the attention pool: (pooled, image tokens [pooled ; one per cell of the last feature
    map]), all in the embedding space. open_clip's ResNet towers return only the pooled token; the cell
    tokens are MaskCLIP's dense features (Zhou et al. 2022): each cell through the pool's value and output
    projections, without the attention that mixes the cells, so each keeps what is at its place. With
    `token_grid` the cells are pooled after the projections, which are affine, so it is the same as pooling
    the feature map first."""
    feature_map = inputs[0]  # [N, C, H, W]
    cells = feature_map.flatten(2).transpose(1, 2) + pool.positional_embedding[1:].to(feature_map.dtype)
    tokens = torch.cat([pooled[:, None], pool.c_proj(pool.v_proj(cells))], 1)
    if token_grid is None:
        return pooled, tokens
    return pooled, pool_token_grid(tokens, feature_map.shape[2:], token_grid)


def _register_and_locate(model_name: str, pretrained: str) -> Path | None:
    """Register a config that sits next to a local checkpoint; check the names. Returns the local file."""
    local = is_checkpoint_file(pretrained)
    if local:
        path = Path(pretrained)
        if not path.is_file():
            raise VlkdError(f"teacher checkpoint {path} does not exist; run `vlkd teacher` or check --pretrained")
        config = path.parent / f"{model_name}.json"
        if config.is_file():
            open_clip.add_model_config(config)
    if model_name not in open_clip.list_models():
        raise VlkdError(f"unknown open_clip model {model_name!r}; `python -c \"import open_clip; "
                        "print(open_clip.list_models())\"` lists the known ones")
    if not local and pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise VlkdError(f"model {model_name!r} has no pretrained tag {pretrained!r} (known: {tags}); "
                        "pass a tag or a checkpoint file as --pretrained")
    return Path(pretrained) if local else None


# ---------------------------------------------------------------------------------------------------
# The teacher folder (the teacher stage's output) as later stages read it
# ---------------------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
SOURCE_TAG = "open_clip pretrained tag"
SOURCE_FILE = "checkpoint file"


def resolve_teacher(folder: Path) -> tuple[str, str]:
    """(open_clip model name, pretrained tag or absolute checkpoint path) of a teacher folder."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise VlkdError(f"no teacher in {folder} ({MANIFEST} is missing); run `vlkd teacher` first or "
                        "pass --model and --pretrained")
    try:
        manifest = json.loads(path.read_text())
        model, pretrained, source = manifest["model"], manifest["pretrained"], manifest["source"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VlkdError(f"{path} is not a teacher manifest ({err}); run `vlkd teacher` again") from err
    if source == SOURCE_TAG:
        return model, pretrained
    return model, str(checkpoint_path(path, source, pretrained))



def checkpoint_path(manifest: Path, source: str, pretrained: str) -> Path:
    """The manifest's checkpoint file: a user's file inside a project is recorded relative to the project
    (as every manifest records paths), anything else relative to the teacher folder."""
    checkpoint = Path(pretrained)
    if checkpoint.is_absolute():
        return checkpoint
    root = project_root(manifest) if source == SOURCE_FILE else None
    return (root or manifest.parent).resolve() / checkpoint


def check_teacher(distilled_from: dict, teacher: dict, where: str) -> None:
    """Refuse features from another teacher (`teacher`, a fingerprint) than the one a student was distilled
    from (`distilled_from`, the fingerprint its config records)."""
    if distilled_from != teacher:
        def described(fingerprint: dict) -> str:
            grid = fingerprint.get("token_grid")
            return (f"{fingerprint['model']} (weights {fingerprint['weights_sha256'][:12]}"
                    f"{f', tokens pooled to {grid} x {grid}' if grid else ''}, open_clip "
                    f"{fingerprint.get('open_clip_version', '?')})")

        raise VlkdError(f"features in {where} were made by teacher {described(teacher)}, but the student was "
                        f"distilled from {described(distilled_from)}; extract features with the student's teacher")
