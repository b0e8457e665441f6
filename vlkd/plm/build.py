"""The language-model stage: make the BART folder that distillation starts from.

    plm.model names a checkpoint -> load it with `from_pretrained`, check it is BART  (no training)
    plm.model is null            -> train a byte-level BPE tokenizer on the corpus, then pretrain a
                                    small BART on it with text infilling (`pretrain`)
    either way                   -> held-out infilling loss and text-only QA (`metrics`) -> vlkd-plm.json

The embedded model learns what the project relies on, from text alone: to answer questions about a
scene described in words (the world's documents are "<description>. Question: q Answer: a ..." or a
plain caption). A folder whose record (`vlkd.record`) matches this run's is kept as it is; otherwise it is
rebuilt whole (`building_folder`).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from vlkd.config import PlmParams
from vlkd.data.text import read_documents
from vlkd.io import building_folder, params_record, write_json_atomic
from vlkd.models.language_model import MANIFEST, load_pretrained, read_manifest, weights_sha256
from vlkd.plm.metrics import evaluate_plm
from vlkd.plm.pretrain import EMBEDDED_NAME, pretrain, train_tokenizer
from vlkd.record import StageRecord
from vlkd.training import Checkpoint, resolve_device

log = logging.getLogger(__name__)

SOURCE_TRAINED = "trained on"
CHECKPOINT = "last.pt"


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------
def build_plm(params: PlmParams) -> dict:
    """Make `params.output` (the model and tokenizer saved with `save_pretrained`, and vlkd-plm.json) and
    return the manifest; its "metrics" are the stage's metrics. An up-to-date folder is left alone."""
    output = Path(params.output)
    record = StageRecord.of("plm", __name__, params, stage_inputs(params), output / MANIFEST)
    if record.reusable(output):
        log.info("language model in %s is up to date with its record; not rebuilt", output)
        return read_manifest(output)
    with building_folder(output, MANIFEST, "language model", "plm.output") as building, _threads(params.device):
        checkpoint = Checkpoint(Path(params.checkpoints) / record.key[:16] / CHECKPOINT)
        manifest = _build(params, building, record.inputs, checkpoint)
        record.write(building)
    _log_metrics(output, manifest["metrics"])
    return manifest


def _build(params: PlmParams, building: Path, inputs: dict, checkpoint: Checkpoint) -> dict:
    """`inputs`: the record's hashes of what the stage reads; `checkpoint`: where the embedded model's
    pretraining resumes from (named by the record, so another run's never)."""
    device = resolve_device(params.device, "plm.device")
    metrics: dict = {}
    if params.model is None:
        documents = read_documents(Path(params.corpus), "plm.corpus")
        tokenizer = train_tokenizer(documents, params.vocab_size, building)
        model, metrics["training"] = pretrain(params, tokenizer, documents, device, checkpoint)
        name, source = EMBEDDED_NAME, f"{SOURCE_TRAINED} {params.corpus}"
    else:
        model, tokenizer, source = load_pretrained(params.model)
        name = params.model
    model.to(device).eval()
    metrics.update(evaluate_plm(model, tokenizer, params, device))
    model.save_pretrained(building)
    tokenizer.save_pretrained(building)
    manifest = {
        "name": name,
        "source": source,
        "sha256": weights_sha256(building),  # weights file -> sha256
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "mask_token_id": tokenizer.mask_token_id,
        "transformers_version": _transformers_version(),
        "params": params_record(params, building / MANIFEST),
        "inputs": {name: inputs[name] for name in ("corpus", "heldout") if name in inputs},  # each text's sha256
        "metrics": metrics,
    }
    write_json_atomic(building / MANIFEST, manifest)
    return manifest


def _log_metrics(output: Path, metrics: dict) -> None:
    loss = metrics.get("heldout_infilling", {})
    qa = metrics.get("qa", {})
    if "loss" in loss:
        log.info("language model in %s: held-out infilling loss %.3f (perplexity %.2f)", output, loss["loss"],
                 loss["perplexity"])
    if "with_description" in qa:
        log.info("text-only QA on %d held-out questions: %.3f with the description, %.3f without (blind)",
                 qa["questions"], qa["with_description"]["accuracy"], qa["blind"]["accuracy"])


@contextmanager
def _threads(device: str):
    """On a CPU, one torch thread per core this process may use (torch counts the machine's cores),
    restored afterwards."""
    before = torch.get_num_threads()
    if resolve_device(device, "plm.device").type == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                  else os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__




def stage_inputs(params: PlmParams) -> dict:
    """What the stage reads: the corpus and the held-out text (the corpus is recorded for a pretrained
    model too: it is the text distillation's retention keeps), and a pretrained model in a local folder
    (a hub name: `from_pretrained` pins nothing)."""
    if params.model is None and (params.corpus is None or not Path(params.corpus).is_file()):
        read_documents(Path(params.corpus or "<plm.corpus is null>"), "plm.corpus")  # raises the one-line error
    inputs: dict = {name: Path(getattr(params, name)) for name in ("corpus", "heldout")
                    if getattr(params, name) is not None and Path(getattr(params, name)).is_file()}
    if params.model is not None and Path(params.model).is_dir():
        inputs["model"] = Path(params.model)
    return inputs
