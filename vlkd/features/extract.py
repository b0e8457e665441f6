"""The features stage: the teacher the params name, frozen, embeds every shard of the corpus into feature
files (`vlkd.data.feature_writer`: resumable, incremental, split across ranks; a shard that cannot be read to
its end gets none, and the summary names it)."""

from __future__ import annotations

from vlkd.config import FeaturesParams
from vlkd.data.feature_writer import Encoding, extract_features
from vlkd.errors import VlkdError
from vlkd.models.teacher import load_teacher, resolve_teacher


def features(params: FeaturesParams, rank: int = 0, world_size: int = 1,
             replace_other_teachers: bool = False) -> dict:
    """Bring `params.output` up to date with `params.shards`; returns the summary (see `extract_features`)."""
    if not 0 <= rank < world_size:
        raise VlkdError(f"--rank {rank} is not in 0..{world_size - 1} (--world-size {world_size})")
    model, pretrained = teacher_names(params)
    teacher = load_teacher(model, pretrained, image_tokens=params.image_tokens, token_grid=params.token_grid)
    encoding = Encoding(params.batch_size, params.num_workers, params.device, params.precision, params.image_tokens)
    return extract_features(params.shards, params.output, teacher, encoding, rank=rank, world_size=world_size,
                            replace_other_teachers=replace_other_teachers)


def teacher_names(params: FeaturesParams) -> tuple[str, str]:
    """(open_clip model, pretrained tag or file): `model` and `pretrained` if given, else the teacher folder's."""
    if (params.model is None) != (params.pretrained is None):
        raise VlkdError("--model and --pretrained go together (or neither, to use the teacher folder)")
    if params.model is not None:
        return params.model, params.pretrained
    return resolve_teacher(params.teacher)
