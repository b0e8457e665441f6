"""The language-model stage: make the BART folder that distillation starts from.

    plm.model names a checkpoint -> load it with `from_pretrained`, check it is BART  (no training)
    plm.model is null            -> train a byte-level BPE tokenizer on the corpus, then pretrain a
                                    small BART on it with text infilling
    either way                   -> held-out infilling loss and text-only QA -> vlkd-plm.json

The embedded model learns what the project relies on, from text alone: to answer questions about a
scene described in words. The world's documents are "<description>. Question: q Answer: a ..." (or a
plain caption), and the model is pretrained with BART's text infilling in two flavours:

- random spans (`mask_ratio` of the tokens in Poisson(`poisson_lambda`) spans, one `<mask>` each,
  `vlkd.models.noising.infill_spans`); the target is the whole document;
- for a share `answer_mask_share` of the documents that have questions: every answer, exactly the words
  after "Answer:", becomes one `<mask>` (the rest of the document stays as it is); the target is the whole
  document. Still text infilling: one span per answer, one mask per span.

The loop is plain: AdamW (no decay on biases, norms and embeddings), linear warmup then cosine decay,
gradient clipping, batches of documents of similar length (less padding), a seeded generator for the
order and the noise, so two runs on a CPU give identical weights.

Metrics: the infilling loss on the held-out documents (fixed noise), and QA accuracy on held-out
questions, asked with the scene's description ("<description>. Question: {q} Answer: <mask>", the
documents' own format) and without it (the blind baseline: what the model guesses from the question
alone). Answers come from beam search, as the evaluate stage generates them, and `extract_infill`.

The folder is built in `<output>.tmp` and swapped in with `replace_folder`; a folder whose manifest
records the same params, inputs and weights is kept as it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlkd.config import PlmParams
from vlkd.errors import VlkdError, first_line
from vlkd.io import (
    params_record,
    project_root,
    remove_path,
    replace_folder,
    sha256_file,
    without_output,
    write_json_atomic,
)
from vlkd.models.infill import MASK, extract_infill, fill_prompt, generate_texts
from vlkd.models.noising import infill_spans
from vlkd.training import decay_groups, resolve_device, warmup_cosine

log = logging.getLogger(__name__)

MANIFEST = "vlkd-plm.json"
EMBEDDED_NAME = "vlkd-tiny-bart"
SOURCE_HUB = "hub"
SOURCE_LOCAL = "local directory"
SOURCE_TRAINED = "trained on"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3 as in BART; <mask> is the last id, as in BART
QA_PROMPT = "Question: {question} Answer: <mask>"  # evaluate.vqa_prompt's default, the documents' own format
QA_BEAMS = 5
QA_EXTRA_TOKENS = 10  # new tokens beyond the prompt's length: BART writes the whole prompt again
EVAL_BATCH = 64
HELDOUT_NOISE_SEED = 1234  # the held-out loss always sees the same noise
BUCKET_BATCHES = 50  # batches drawn from one length-sorted pool of shuffled documents
WEIGHT_FILES = ("*.safetensors", "*.bin")
QA_PAIR = re.compile(r"Question:\s*(?P<question>.+?)\s+Answer:\s*(?P<answer>.*?)\s*(?=Question:|$)")


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------
def build_plm(params: PlmParams) -> dict:
    """Make `params.output` (the model and tokenizer saved with `save_pretrained`, and vlkd-plm.json) and
    return the manifest; its "metrics" are the stage's metrics. An up-to-date folder is left alone."""
    output = Path(params.output)
    inputs = _inputs(params)
    current = _up_to_date(output, params, inputs)
    if current is not None:
        log.info("language model in %s is up to date (same params, inputs and weights); not rebuilt", output)
        return current
    _check_replaceable(output)
    building = output.parent / (output.name + ".tmp")
    try:
        remove_path(building)
        building.mkdir(parents=True)
    except OSError as err:
        raise VlkdError(f"cannot create {building} ({err.strerror}); choose a writable plm.output") from err
    try:
        with _threads(params.device):
            manifest = _build(params, building, inputs)
        replace_folder(building, output)
    except OSError as err:
        remove_path(building)
        raise VlkdError(f"cannot write the language model to {output} ({err.strerror or err}); check the "
                        "disk and plm.output") from err
    except BaseException:
        remove_path(building)
        raise
    _log_metrics(output, manifest["metrics"])
    return manifest


def _build(params: PlmParams, building: Path, inputs: dict) -> dict:
    device = resolve_device(params.device, "plm.device")
    metrics: dict = {}
    if params.model is None:
        documents = read_documents(Path(params.corpus), "plm.corpus")
        tokenizer = train_tokenizer(documents, params.vocab_size, building)
        model, metrics["training"] = pretrain(params, tokenizer, documents, device)
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
        "inputs": inputs,
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


# ---------------------------------------------------------------------------------------------------
# Inputs, the folder and its manifest
# ---------------------------------------------------------------------------------------------------
def read_documents(path: Path, field: str) -> list[str]:
    """The non-empty lines of a text file, whitespace collapsed."""
    if not path.is_file():
        raise VlkdError(f"{field} {path} does not exist; run `vlkd synth` or point {field} at a text file "
                        "with one document per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise VlkdError(f"cannot read {field} {path} ({err}); it must be a UTF-8 text file") from err
    documents = [" ".join(line.split()) for line in lines if line.strip()]
    if not documents:
        raise VlkdError(f"{field} {path} has no text (empty or blank lines only); give one document per line")
    return documents


def _inputs(params: PlmParams) -> dict:
    """sha256 of the text files the stage reads: a changed corpus or held-out file rebuilds the folder.
    The corpus is recorded for a pretrained model too: it is the text distillation's retention keeps."""
    inputs = {}
    if params.model is None and (params.corpus is None or not Path(params.corpus).is_file()):
        read_documents(Path(params.corpus or "<plm.corpus is null>"), "plm.corpus")  # raises the one-line error
    for name in ("corpus", "heldout"):
        path = getattr(params, name)
        if path is not None and Path(path).is_file():
            inputs[name] = sha256_file(Path(path))
    return inputs


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


def _up_to_date(output: Path, params: PlmParams, inputs: dict) -> dict | None:
    path = output / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if without_output(manifest["params"]) != without_output(params_record(params, path)):
            return None
        if manifest["inputs"] != inputs or not manifest["sha256"]:
            return None
        if weights_sha256(output) != manifest["sha256"]:
            return None
        # A hub name: `from_pretrained` pins nothing, but the weights we saved are the ones recorded.
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.info("language model manifest %s unreadable (%s); rebuilding", path, err)
        return None
    return manifest


def _check_replaceable(output: Path) -> None:
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / MANIFEST).is_file())):
        raise VlkdError(f"{output} exists and is not a language-model folder (no {MANIFEST}); refusing to replace "
                        "it: choose another plm.output or remove it")


def read_manifest(folder: Path) -> dict:
    """The manifest of a folder made by this stage."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise VlkdError(f"no language model in {folder} ({MANIFEST} is missing); run `vlkd plm` first")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise VlkdError(f"{path} is not a language-model manifest ({err}); run `vlkd plm` again") from err


# ---------------------------------------------------------------------------------------------------
# A pretrained BART
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# The embedded model: tokenizer
# ---------------------------------------------------------------------------------------------------
def train_tokenizer(documents: list[str], vocab_size: int, folder: Path):
    """A byte-level BPE tokenizer trained on `documents`, wrapped as BART's: <s> <pad> </s> <unk> are ids
    0-3 and <mask> the last id (it swallows the space before it, as BART's does). Its vocab.json and
    merges.txt are written to `folder`; a corpus with few words stops below `vocab_size`."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import BartTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(documents, vocab_size=vocab_size - 1, min_frequency=2,
                            special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))
    vocab_file = folder / "vocab.json"
    vocab = json.loads(vocab_file.read_text())
    vocab[MASK] = len(vocab)
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
    tokenizer = BartTokenizerFast(vocab=str(vocab_file), merges=str(folder / "merges.txt"),
                                  mask_token=AddedToken(MASK, lstrip=True, rstrip=False, normalized=False,
                                                        special=True))
    ids = [tokenizer.convert_tokens_to_ids(token) for token in (*SPECIAL_TOKENS, MASK)]
    if ids != [0, 1, 2, 3, len(vocab) - 1]:
        raise RuntimeError(f"special token ids {ids} are not BART's layout")
    log.info("trained a byte-level BPE tokenizer on %d documents: %d tokens", len(documents), len(tokenizer))
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# The embedded model: text infilling data
# ---------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """One document as token ids (no BOS/EOS) and the token span of every answer: [start, end)."""

    tokens: list[int]
    answers: list[tuple[int, int]]


def qa_pairs(document: str) -> tuple[str, list[tuple[str, str, int, int]]]:
    """(description, [(question, answer, answer start char, answer end char)]) of a document; a plain
    caption is all description. The description loses its final period."""
    pairs = [(m["question"], m["answer"], m.start("answer"), m.end("answer"))
             for m in QA_PAIR.finditer(document) if m["answer"]]
    first = QA_PAIR.search(document)
    description = document[:first.start()] if first else document
    return description.strip().rstrip(".").strip(), pairs


def encode_documents(tokenizer, documents: list[str], max_length: int) -> list[Encoded]:
    """Token ids truncated to `max_length` tokens with BOS and EOS; answers cut by truncation are dropped."""
    batch = tokenizer(documents, add_special_tokens=False, return_offsets_mapping=True)
    limit = max_length - 2
    encoded = []
    for document, ids, offsets in zip(documents, batch["input_ids"], batch["offset_mapping"], strict=True):
        ids, offsets = ids[:limit], offsets[:limit]
        answers = []
        for _, _, begin, end in qa_pairs(document)[1]:
            inside = [i for i, (start, stop) in enumerate(offsets) if start >= begin and stop <= end and stop > start]
            if inside and inside[-1] - inside[0] + 1 == len(inside) and inside[-1] < len(ids):
                answers.append((inside[0], inside[-1] + 1))
        encoded.append(Encoded(list(ids), answers))
    return encoded


def make_example(doc: Encoded, tokenizer, params: PlmParams,
                 rng: np.random.Generator) -> tuple[list[int], list[int], str]:
    """(encoder input, labels, "answers" or "spans") of one document, both with BOS and EOS; the labels are
    the whole document. For a share `answer_mask_share` of the documents with questions every answer (the
    words after "Answer:") becomes one `<mask>`; otherwise random spans are masked."""
    bos, eos, mask = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id
    target = [bos, *doc.tokens, eos]
    if doc.answers and rng.random() < params.answer_mask_share:
        source, last = [bos], 0
        for start, end in doc.answers:
            source += [*doc.tokens[last:start], mask]
            last = end
        return [*source, *doc.tokens[last:], eos], target, "answers"
    return [bos, *infill_spans(doc.tokens, mask, params.mask_ratio, params.poisson_lambda, rng), eos], target, "spans"


def length_batches(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Indices in batches of documents of similar length: shuffle, sort pools of `BUCKET_BATCHES` batches by
    length, cut them into batches, shuffle the batches."""
    order = rng.permutation(len(lengths))
    pool = batch_size * BUCKET_BATCHES
    batches = []
    for begin in range(0, len(order), pool):
        chunk = sorted(order[begin:begin + pool].tolist(), key=lambda index: lengths[index])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded encoder inputs and labels (-100 on padding: BART shifts labels into decoder inputs)."""
    width_in = max(len(source) for source, _ in examples)
    width_out = max(len(target) for _, target in examples)
    input_ids = torch.full((len(examples), width_in), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width_out), -100, dtype=torch.long)
    for row, (source, target) in enumerate(examples):
        input_ids[row, :len(source)] = torch.tensor(source)
        labels[row, :len(target)] = torch.tensor(target)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": labels}


# ---------------------------------------------------------------------------------------------------
# The embedded model: pretraining
# ---------------------------------------------------------------------------------------------------
def create_model(params: PlmParams, tokenizer):
    """A freshly initialised BART sized by `params`, its special ids and generation defaults BART's."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=len(tokenizer), d_model=params.d_model,
        encoder_layers=params.layers, decoder_layers=params.layers,
        encoder_attention_heads=params.heads, decoder_attention_heads=params.heads,
        encoder_ffn_dim=params.ffn_dim, decoder_ffn_dim=params.ffn_dim,
        max_position_embeddings=params.max_positions, dropout=params.dropout, init_std=params.d_model ** -0.5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=tokenizer.bos_token_id, forced_eos_token_id=tokenizer.eos_token_id,
    )
    model = BartForConditionalGeneration(config)
    with torch.no_grad():
        for positions in (model.model.encoder.embed_positions, model.model.decoder.embed_positions):
            positions.weight.copy_(sinusoids(positions.weight.shape[0], params.d_model, config.init_std))
    generation = model.generation_config
    generation.decoder_start_token_id = tokenizer.eos_token_id
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.forced_bos_token_id, generation.forced_eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    return model


def sinusoids(length: int, width: int, std: float) -> torch.Tensor:
    """The Transformer's sinusoidal position encodings, scaled to `std` per component like the token
    embeddings. They start BART's learned positions: "the previous token" is then a fixed rotation of the
    encoding, which the attention heads that bind a colour to its shape need; from a random start they
    take thousands of steps to find it."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : width // 2]
    return table * (std * math.sqrt(2))


def pretrain(params: PlmParams, tokenizer, documents: list[str], device: torch.device | str = "cpu"):
    """Pretrain a new BART on `documents` with text infilling. Returns (model in eval mode, training record)."""
    if params.max_length > params.max_positions:
        raise VlkdError(f"plm.max_length {params.max_length} is more than plm.max_positions {params.max_positions}; "
                        "raise max_positions or lower max_length")
    device = torch.device(device)
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    model = create_model(params, tokenizer).to(device)
    encoded = encode_documents(tokenizer, documents, params.max_length)
    lengths = [len(doc.tokens) for doc in encoded]
    steps_per_epoch = math.ceil(len(encoded) / params.batch_size)
    total = params.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(decay_groups(model, params.weight_decay), lr=params.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    log.info("pretraining %s (%d parameters) on %d documents: %d epochs of %d steps (batch %d) on %s",
             EMBEDDED_NAME, sum(p.numel() for p in model.parameters()), len(encoded), params.epochs,
             steps_per_epoch, params.batch_size, device)
    started, step, epoch_losses, answer_masked = time.perf_counter(), 0, [], 0
    model.train()
    with tqdm(total=total, desc="plm", unit="step", disable=None) as bar:
        for epoch in range(params.epochs):
            losses = []
            for indices in length_batches(lengths, params.batch_size, rng):
                examples = [make_example(encoded[i], tokenizer, params, rng) for i in indices]
                answer_masked += sum(kind == "answers" for _, _, kind in examples)
                examples = [(source, target) for source, target, _ in examples]
                batch = {name: tensor.to(device) for name, tensor in collate(examples, tokenizer.pad_token_id).items()}
                for group in optimizer.param_groups:
                    group["lr"] = warmup_cosine(step, params.lr, params.warmup_steps, total)
                loss = model(**batch).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), params.max_grad_norm)
                optimizer.step()
                losses.append(loss.item())
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
            epoch_losses.append(sum(losses) / len(losses))
            log.info("epoch %d/%d: mean infilling loss %.4f", epoch + 1, params.epochs, epoch_losses[-1])
    model.eval()
    seconds = time.perf_counter() - started
    record = {
        "loss_first_epoch": round(epoch_losses[0], 6),
        "loss_last_epoch": round(epoch_losses[-1], 6),
        "loss_per_epoch": [round(loss, 6) for loss in epoch_losses],
        "epochs": params.epochs,
        "steps": step,
        "documents": len(encoded),
        "documents_with_answers": sum(bool(doc.answers) for doc in encoded),
        "answer_masked_examples": answer_masked,
        "examples": params.epochs * len(encoded),
        "truncated_documents": sum(length > params.max_length - 2 for length in lengths),
        "vocab_size": len(tokenizer),
    }
    log.info("pretrained in %.1f s: loss %.3f -> %.3f", seconds, epoch_losses[0], epoch_losses[-1])
    return model, record


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------
def evaluate_plm(model, tokenizer, params: PlmParams, device: torch.device | str = "cpu") -> dict:
    """Held-out infilling loss and text-only QA on `params.heldout` (skipped, with a reason, without it)."""
    if params.heldout is None or not Path(params.heldout).is_file():
        why = "plm.heldout is null" if params.heldout is None else f"{params.heldout} does not exist"
        log.warning("held-out metrics not measured: %s (set plm.heldout)", why)
        return {"heldout_infilling": {"skipped": why}, "qa": {"skipped": why}}
    path = Path(params.heldout)
    documents = read_documents(path, "plm.heldout")
    return {
        "heldout_infilling": infilling_loss(model, tokenizer, documents, params.mask_ratio, params.poisson_lambda,
                                            params.max_length, device=device),
        "qa": text_qa(model, tokenizer, documents, params.qa_questions, params.seed, device=device),
    }


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


def text_qa(model, tokenizer, documents: list[str], sample: int, seed: int = 0,
            device: torch.device | str = "cpu") -> dict:
    """Accuracy (exact match, case and surrounding punctuation ignored) of answering held-out questions
    from text: with the scene's description in front of the prompt, and without it (blind). At most
    `sample` questions, drawn with `seed`."""
    questions = [(description, question, answer) for description, pairs in map(qa_pairs, documents)
                 for question, answer, _, _ in pairs if description]
    if not questions:
        return {"skipped": "no questions in the held-out documents"}
    available = len(questions)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(available, size=min(sample, available), replace=False).tolist())
    questions = [questions[i] for i in chosen]
    result = {"questions": len(questions), "available": available, "prompt": QA_PROMPT, "num_beams": QA_BEAMS,
              "max_new_tokens": f"prompt tokens + {QA_EXTRA_TOKENS}",
              "match": "exact, case and end punctuation ignored"}
    for setting, with_description in (("with_description", True), ("blind", False)):
        prompts = [(f"{description}. " if with_description else "") + fill_prompt(QA_PROMPT, question=question)
                   for description, question, _ in questions]
        predictions = generate_infills(model, tokenizer, prompts, device=device)
        result[setting] = _accuracy(questions, predictions)
        result[setting]["examples"] = [{"prompt": prompt, "answer": answer, "predicted": predicted}
                                       for prompt, (_, _, answer), predicted in
                                       list(zip(prompts, questions, predictions, strict=True))[:5]]
    return result


def _accuracy(questions: list[tuple[str, str, str]], predictions: list[str]) -> dict:
    """Overall exact-match accuracy and per question type (the question's first two words, as VQA's
    question types are its first words)."""
    right: dict[str, list[bool]] = defaultdict(list)
    for (_, question, answer), predicted in zip(questions, predictions, strict=True):
        kind = " ".join(question.lower().split()[:2])
        right[kind].append(_clean(predicted) == _clean(answer))
    every = [hit for hits in right.values() for hit in hits]
    return {"accuracy": round(sum(every) / len(every), 4),
            "per_question_type": {kind: round(sum(hits) / len(hits), 4) for kind, hits in sorted(right.items())}}


def _clean(answer: str) -> str:
    return answer.lower().strip().strip(".!?,;:").strip()


@torch.no_grad()
def generate_infills(model, tokenizer, prompts: list[str], num_beams: int = QA_BEAMS,
                     extra_tokens: int = QA_EXTRA_TOKENS, batch_size: int = EVAL_BATCH,
                     device: torch.device | str = "cpu") -> list[str]:
    """What the model writes in place of each prompt's `<mask>`: beam search over batches of prompts of
    similar length, at most (the batch's longest prompt + `extra_tokens`) new tokens."""
    model.eval()
    device = torch.device(device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[str] = [""] * len(prompts)
    for begin in range(0, len(order), batch_size):
        indices = order[begin:begin + batch_size]
        batch = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True).to(device)
        texts = generate_texts(model, tokenizer, dict(batch), num_beams, batch["input_ids"].shape[1] + extra_tokens)
        for i, text in zip(indices, texts, strict=True):
            results[i] = extract_infill(prompts[i], text)
    return results
