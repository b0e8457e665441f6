"""The frozen CLIP teacher: loading through open_clip's own factory, and its fingerprint.

A teacher is named the way open_clip names models: an architecture plus a pretrained tag
(`ViT-L-14` / `openai`) or a local checkpoint file. A checkpoint may carry its architecture's config
next to it as `<model>.json` (the teacher stage writes one for the embedded model); it is registered
with open_clip before loading, so `create_model_and_transforms(model, pretrained=<file>)` works.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet

from vlkd.errors import VlkdError
from vlkd.io import sha256_file, tmp_path_for, write_json_atomic

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")
CHECKPOINT_NAME = "open_clip_model.safetensors"  # the name open_clip's `local-dir:` loader looks for first

# The embedded teacher: open_clip's ModifiedResNet (the architecture of CLIP RN50) at toy size, which trains on
# the synthetic world in minutes on a CPU. The ViT used before (4 layers, width 128, 8-pixel patches) learnt far
# less of the shapes and positions from 2,000 images: linear probes on the image embedding of held-out training
# images read shape 43% and position 57% (one caption per image, 12 epochs); this one 51% and 90% (one caption,
# 15 epochs) and 66% and 83% with three captions per image (15 epochs); colour 100% in every case. From 10,000
# images (6 epochs): shape 93%, position 89%.
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

    def as_dict(self) -> dict[str, str]:
        return {"model": self.model, "weights_sha256": self.weights_sha256,
                "open_clip_version": self.open_clip_version}


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
                 image_tokens: bool = False) -> Teacher:
    """The frozen teacher in eval mode; with `image_tokens`, encode_image also returns patch tokens."""
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
    if image_tokens:
        if isinstance(model.visual, ModifiedResNet):
            model.visual.attnpool.register_forward_hook(_with_cell_tokens)
        elif hasattr(model.visual, "output_tokens"):
            model.visual.output_tokens = True
        else:
            raise VlkdError(f"model {model_name!r} has no image tokens (ViT and ModifiedResNet towers do); "
                            "set features.image_tokens: false")
    size = model.visual.image_size
    return Teacher(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(model_name),
        fingerprint=Fingerprint(model_name, sha256_file(weights), open_clip.__version__),
        embed_dim=open_clip.get_model_config(model_name)["embed_dim"],
        image_size=size[0] if isinstance(size, tuple | list) else size,
    )


def _with_cell_tokens(pool: AttentionPool2d, inputs: tuple[torch.Tensor], pooled: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward hook on the attention pool: (pooled, image tokens [pooled ; one per cell of the last feature
    map]), all in the embedding space. open_clip's ResNet towers return only the pooled token; the cell
    tokens are MaskCLIP's dense features (Zhou et al. 2022): each cell through the pool's value and output
    projections, without the attention that mixes the cells, so each keeps what is at its place."""
    feature_map = inputs[0]  # [N, C, H, W]
    cells = feature_map.flatten(2).transpose(1, 2) + pool.positional_embedding[1:].to(feature_map.dtype)
    return pooled, torch.cat([pooled[:, None], pool.c_proj(pool.v_proj(cells))], 1)


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
