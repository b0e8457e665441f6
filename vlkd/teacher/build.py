"""The teacher stage: make the teacher folder the features stage reads.

    pretrained tag or file -> load it through open_clip to check it        (no training)
    nothing pretrained     -> train the embedded model contrastively on the shards (`contrastive`)
    either way             -> zero-shot retrieval on the held-out split (`retrieval`) -> manifest.json,
                              metrics.json

A folder whose record (`vlkd.record`) matches this run's (the inputs it reads, the params, the code, the
libraries) and whose files are the recorded ones is kept as it is; otherwise it is rebuilt whole
(`building_folder`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from vlkd.config import TeacherParams
from vlkd.data.webdataset import training_shards
from vlkd.errors import VlkdError
from vlkd.io import building_folder, params_record, write_json_atomic
from vlkd.models.teacher import (
    CHECKPOINT_NAME,
    EMBEDDED_MODEL,
    MANIFEST,
    SOURCE_FILE,
    SOURCE_TAG,
    is_checkpoint_file,
    load_teacher,
)
from vlkd.record import StageRecord
from vlkd.teacher.contrastive import train_contrastive, training_setup
from vlkd.teacher.retrieval import evaluate_retrieval
from vlkd.training import resolve_device

log = logging.getLogger(__name__)

METRICS = "metrics.json"
SOURCE_TRAINED = "trained on"


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------
def build_teacher(params: TeacherParams) -> dict:
    """Make `params.output` (manifest.json, metrics.json and, for the embedded model, its checkpoint and
    config) and return the manifest. An up-to-date folder is left alone."""
    output = Path(params.output)
    record = StageRecord.of("teacher", __name__, params, stage_inputs(params), output / MANIFEST)
    if record.reusable(output):
        log.info("teacher in %s is up to date with its record; not rebuilt", output)
        return read_json(output / MANIFEST)
    device = resolve_device(params.device, "teacher.device")
    with building_folder(output, MANIFEST, "teacher", "teacher.output") as building:
        manifest = _build(params, building, device, record.inputs.get("shards", {}))
        record.write(building)
    _log_retrieval(output, read_json(output / METRICS)["retrieval"])
    return manifest


def _build(params: TeacherParams, building: Path, device: torch.device, shards: dict[str, str]) -> dict:
    """Fill `building` with the teacher, its metrics and its manifest; returns the manifest. `shards`: the
    training shards' hashes by name (none for a pretrained teacher)."""
    metrics: dict = {}
    if params.pretrained is None:
        if params.model != EMBEDDED_MODEL:
            raise VlkdError(f"teacher.pretrained is null, which trains the embedded model {EMBEDDED_MODEL!r}, but "
                            f"teacher.model is {params.model!r}; set teacher.model: {EMBEDDED_MODEL} or give a "
                            "pretrained tag or checkpoint file")
        _, metrics["training"] = train_contrastive(params, building, device,
                                                   shards=[Path(params.shards) / name for name in shards])
        setup = training_setup(params.image_size)
        pretrained, source = CHECKPOINT_NAME, f"{SOURCE_TRAINED} {params.shards}"
        teacher = load_teacher(EMBEDDED_MODEL, str(building / CHECKPOINT_NAME), device=device)
    else:
        setup = {}
        local = is_checkpoint_file(params.pretrained)
        pretrained = str(Path(params.pretrained).resolve()) if local else params.pretrained
        source = SOURCE_FILE if local else SOURCE_TAG
        log.info("checking the teacher %s / %s (no training)", params.model, pretrained)
        teacher = load_teacher(params.model, pretrained, device=device)
    metrics["retrieval"] = evaluate_retrieval(teacher, Path(params.eval_images), Path(params.eval_captions), device)
    manifest = {
        "model": teacher.fingerprint.model,
        "pretrained": pretrained,
        "source": source,
        "weights_sha256": teacher.fingerprint.weights_sha256,
        "open_clip_version": teacher.fingerprint.open_clip_version,
        "embed_dim": teacher.embed_dim,
        "image_size": teacher.image_size,
        "preprocess": teacher.preprocess_description,
        "params": params_record(params, building / MANIFEST),
        "inputs": {"shards": shards},
        "training_setup": setup,
    }
    write_json_atomic(building / METRICS, metrics)
    write_json_atomic(building / MANIFEST, manifest)
    return manifest


def _log_retrieval(output: Path, retrieval: dict) -> None:
    if retrieval.get("skipped"):
        log.info("teacher in %s (retrieval not measured: %s)", output, retrieval["skipped"])
    else:
        log.info("teacher in %s: image->text R@1 %.3f (chance %.3f), text->image R@1 %.3f (chance %.3f)", output,
                 retrieval["image_to_text"]["recall@1"], retrieval["image_to_text"]["chance@1"],
                 retrieval["text_to_image"]["recall@1"], retrieval["text_to_image"]["chance@1"])


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def stage_inputs(params: TeacherParams) -> dict:
    """What the stage reads with these params: the training shards it takes (`train_shards`, by content)
    or the checkpoint file, and the held-out split. A pretrained tag reads neither: open_clip's tag pins
    the file in its cache."""
    inputs: dict = {"eval_images": Path(params.eval_images), "eval_captions": Path(params.eval_captions)}
    if params.pretrained is None:
        inputs["shards"] = _training_shards(params)
    elif is_checkpoint_file(params.pretrained):
        inputs["checkpoint"] = Path(params.pretrained)
    return inputs


def _training_shards(params: TeacherParams) -> dict[str, Path]:
    if not Path(params.shards).exists():
        raise VlkdError(f"teacher.shards {params.shards} does not exist: the embedded teacher trains on the "
                        "shards it names (the synthetic world's own pairs: `vlkd synth` with "
                        "synth.pretrain_images above 0; a corpus: `vlkd download`); make them or point "
                        "teacher.shards at a shard folder")
    return training_shards(Path(params.shards), params.train_shards)


# ---------------------------------------------------------------------------------------------------
# Training the embedded model
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# Zero-shot retrieval on the held-out split
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------------
