"""The vision-language model stage: make the ViLT folder that CLIP-TD fine-tunes.

    vlm.model names a checkpoint -> load it with `from_pretrained` (model and processor), no training
    vlm.model is null            -> a WordPiece tokenizer trained on the shards' captions, a ViLT built from
                                    its config and pretrained with ITM + MLM (`pretrain`); undecodable
                                    samples and shards that cannot be read are left out, counted and named

The folder holds the ViltForMaskedLM and ViltProcessor (`save_pretrained`) and vlkd-vlm.json. A folder whose
record (`vlkd.record`) matches this run's is kept as it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from vlkd.config import VlmParams
from vlkd.data.webdataset import read_pairs, training_shards
from vlkd.errors import VlkdError
from vlkd.io import building_folder, params_record, sha256_file, write_json_atomic
from vlkd.models.vilt import image_processor, tiny_config, train_tokenizer
from vlkd.record import StageRecord
from vlkd.training import resolve_device
from vlkd.vlm.pretrain import Pretraining, decode_images, heldout_metrics, pretrain

log = logging.getLogger(__name__)

MANIFEST = "vlkd-vlm.json"
EMBEDDED_NAME = "vlkd-tiny-vilt"


def build_vlm(params: VlmParams) -> dict:
    """Make `params.output` and return its manifest (whose "metrics" are the stage's metrics)."""
    output = Path(params.output)
    record = StageRecord.of("vlm", __name__, params, stage_inputs(params), output / MANIFEST)
    if record.reusable(output):
        log.info("vision-language model in %s is up to date with its record; not rebuilt", output)
        return json.loads((output / MANIFEST).read_text())
    device = resolve_device(params.device, "vlm.device")
    with building_folder(output, MANIFEST, "vision-language model", "vlm.output") as building:
        manifest = _build(params, building, record.inputs.get("shards", {}), device)
        record.write(building)
    log.info("vision-language model %s in %s: %s", manifest["name"], output, manifest["metrics"].get("heldout"))
    return manifest


def stage_inputs(params: VlmParams) -> dict:
    """What the stage reads with these params: the training shards (`train_shards` of them), or a ViLT in a
    local folder (a hub name: `from_pretrained` pins nothing)."""
    if params.model is None:
        return {"shards": training_shards(Path(params.shards), params.train_shards)}
    return {"model": Path(params.model)} if Path(params.model).is_dir() else {}


def _build(params: VlmParams, building: Path, shards: dict[str, str], device: torch.device) -> dict:
    from transformers import ViltForMaskedLM, ViltProcessor

    metrics: dict = {}
    if params.model is None:
        data = read_pairs([Path(params.shards) / name for name in shards])
        images, captions = data.images, data.captions
        if len(images) < 2:
            raise VlkdError(f"{len(images)} decodable image(s) in {params.shards}; pretraining needs at least 2")
        tokenizer = train_tokenizer([text for texts in captions for text in texts], params.vocab_size,
                                    params.max_length)
        processor = ViltProcessor(image_processor(params.image_size), tokenizer)
        pixels = decode_images(images, processor)
        heldout = round(len(images) * params.heldout_share)
        torch.manual_seed(params.seed)
        model = Pretraining(ViltForMaskedLM(tiny_config(
            len(tokenizer), params.image_size, params.patch_size, params.hidden, params.layers, params.heads,
            params.ffn_dim, params.max_length)))
        train_count = len(images) - heldout
        metrics["training"] = pretrain(params, model, tokenizer, pixels[:train_count], captions[:train_count], device)
        metrics["heldout"] = heldout_metrics(params, model, tokenizer, pixels[train_count:], captions[train_count:],
                                             device)
        metrics["bad_samples"] = {"count": len(data.bad), "keys": data.bad[:20]}
        metrics["unreadable_shards"] = {"count": len(data.unreadable), "reasons": data.unreadable}
        masked_lm, name, source = model.masked_lm, EMBEDDED_NAME, f"pretrained on {params.shards}"
    else:
        try:
            masked_lm = ViltForMaskedLM.from_pretrained(params.model)
            processor = ViltProcessor.from_pretrained(params.model)
        except (OSError, ValueError) as err:
            raise VlkdError(f"vlm.model {params.model!r} is not a ViLT checkpoint ({str(err).splitlines()[0][:160]}); "
                            "name a hub model such as dandelin/vilt-b32-mlm or a folder saved with "
                            "save_pretrained") from err
        name, source = params.model, "from_pretrained"
    masked_lm.save_pretrained(building)
    processor.save_pretrained(building)
    manifest = {
        "name": name,
        "source": source,
        "parameters": sum(p.numel() for p in masked_lm.parameters()),
        "image_size": processor.image_processor.size.get("shortest_edge"),
        "sha256": _weights_sha256(building),
        "params": params_record(params, building / MANIFEST),
        "inputs": {"shards": shards} if shards else {},
        "metrics": metrics,
    }
    write_json_atomic(building / MANIFEST, manifest)
    return manifest


def _weights_sha256(folder: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(folder.glob("*.safetensors"))}
