"""The language-model folder (the plm stage's output) as later stages read it: its manifest, the text it
was built with (checked by sha256), its weights' hashes; loading a BART by hub name or local directory;
the held-out infilling loss that the plm stage reports and evaluation's retention compares."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from vlkd.data.noising import infill_spans
from vlkd.data.text import collate, encode_documents
from vlkd.errors import VlkdError, first_line
from vlkd.io import project_root, sha256_file
from vlkd.models.infill import MASK

log = logging.getLogger(__name__)

MANIFEST = "vlkd-plm.json"
SOURCE_HUB = "hub"
SOURCE_LOCAL = "local directory"
EVAL_BATCH = 64
HELDOUT_NOISE_SEED = 1234  # the held-out loss always sees the same noise
WEIGHT_FILES = ("*.safetensors", "*.bin")


def language_model_text(folder: Path, name: str, field: str, required: bool = True) -> Path | None:
    """The language model's `corpus` or `heldout` file as its folder's manifest records it, checked to be
    unchanged since the model was built (a later stage must read the text the model was built with).
    None if the model was built without one (or elsewhere, with no manifest) and the text is not `required`."""
    if not required and not (Path(folder) / MANIFEST).is_file():
        return None
    manifest = read_manifest(folder)
    recorded = manifest.get("params", {}).get(name)
    if recorded is None or name not in manifest.get("inputs", {}):
        if not required:
            return None
        raise VlkdError(f"{field} needs the language model's {name} text, and {folder} was built without one; set "
                        f"plm.{name} to a text file (one document per line) and run `vlkd plm` again")
    path = Path(recorded)
    if not path.is_absolute():
        path = (project_root(Path(folder) / MANIFEST) or Path.cwd()) / path
    if not path.is_file() or sha256_file(path) != manifest["inputs"][name]:
        raise VlkdError(f"{path}, the plm.{name} that {folder} was built with, is missing or has changed since; "
                        "run `vlkd plm` again (dvc repro does)")
    return path


def weights_sha256(folder: Path) -> dict[str, str]:
    """sha256 of every weights file in a saved folder (one, or several shards of a large model)."""
    files = sorted({path for pattern in WEIGHT_FILES for path in Path(folder).glob(pattern)})
    return {path.name: sha256_file(path) for path in files}


def read_manifest(folder: Path) -> dict:
    """The manifest of a folder made by this stage."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise VlkdError(f"no language model in {folder} ({MANIFEST} is missing); run `vlkd plm` first")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise VlkdError(f"{path} is not a language-model manifest ({err}); run `vlkd plm` again") from err


def load_pretrained(name: str):
    """(model, tokenizer, source) of a hub name or a local directory, checked to be a BART encoder-decoder
    whose tokenizer has a `<mask>` token."""
    from transformers import AutoConfig, AutoTokenizer, BartForConditionalGeneration

    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise VlkdError(f"plm.model {name} is a file, not a model directory; give the folder that "
                            "save_pretrained wrote, or a hub name")
        location, source = str(local.resolve()), SOURCE_LOCAL
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise VlkdError(f"plm.model {name} does not exist; give an existing model directory or a hub name "
                        "such as facebook/bart-base")
    else:
        location, source = name, SOURCE_HUB
    log.info("loading the language model %s (%s)", name, source)
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError, KeyError) as err:
        raise VlkdError(f"cannot load plm.model {name}: {first_line(err)}; check the name (or the hub's "
                        "reachability and cache) or give a local directory") from err
    if config.model_type != "bart" or not getattr(config, "is_encoder_decoder", False):
        raise VlkdError(f"plm.model {name} is a {config.model_type!r} model, not a BART encoder-decoder; give a "
                        "BART checkpoint such as facebook/bart-base")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = BartForConditionalGeneration.from_pretrained(location)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise VlkdError(f"cannot load plm.model {name}: {first_line(err)}; check that the directory holds a "
                        "complete save_pretrained model and tokenizer") from err
    if tokenizer.mask_token_id is None:
        raise VlkdError(f"the tokenizer of plm.model {name} has no {MASK} token, which text infilling needs; "
                        "give a BART checkpoint whose tokenizer has one")
    if tokenizer.mask_token_id >= model.config.vocab_size:
        raise VlkdError(f"the {MASK} id {tokenizer.mask_token_id} of plm.model {name} is outside the model's "
                        f"vocabulary ({model.config.vocab_size}); tokenizer and model do not belong together")
    return model, tokenizer, source


@torch.no_grad()
def infilling_loss(model, tokenizer, documents: list[str], mask_ratio: float, poisson_lambda: float,
                   max_length: int, seed: int = HELDOUT_NOISE_SEED, batch_size: int = EVAL_BATCH,
                   device: torch.device | str = "cpu") -> dict:
    """Mean cross-entropy per target token of reconstructing `documents` from random-span noise drawn
    with `seed` (the same noise for every model with the same tokenizer), and its perplexity."""
    model.eval()
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    mask, bos, eos = tokenizer.mask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    encoded = encode_documents(tokenizer, documents, max_length)
    examples = [([bos, *infill_spans(doc.tokens, mask, mask_ratio, poisson_lambda, rng), eos],
                 [bos, *doc.tokens, eos]) for doc in encoded]
    total, count = 0.0, 0
    for begin in range(0, len(examples), batch_size):
        batch = {name: tensor.to(device)
                 for name, tensor in collate(examples[begin:begin + batch_size], tokenizer.pad_token_id).items()}
        logits = model(**batch).logits.float()
        labels = batch["labels"]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                   reduction="sum").item()
        count += int((labels != -100).sum())
    loss = total / max(1, count)
    return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50)), 4), "documents": len(examples),
            "tokens": count, "noise_seed": seed, "mask_ratio": mask_ratio, "poisson_lambda": poisson_lambda}
