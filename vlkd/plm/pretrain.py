"""Pretrain the embedded language model: a byte-level BPE tokenizer trained on the corpus, then a small
BART pretrained on it with BART's text infilling in two flavours:

- random spans (`mask_ratio` of the tokens in Poisson(`poisson_lambda`) spans, one `<mask>` each); the
  target is the whole document;
- for a share `answer_mask_share` of the documents that have questions: every answer, exactly the words
  after "Answer:", becomes one `<mask>`; the target is the whole document. Still text infilling: one span
  per answer, one mask per span.

Batches hold documents of similar length (less padding); a seeded generator gives the order and the
noise, so two runs on a CPU give identical weights.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from vlkd.config import PlmParams
from vlkd.data.text import Noise, collate, encode_documents, length_batches, make_example
from vlkd.errors import VlkdError
from vlkd.models.infill import MASK
from vlkd.training import Checkpoint, EpochMeans, Optimization, progress

log = logging.getLogger(__name__)

EMBEDDED_NAME = "vlkd-tiny-bart"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3 as in BART; <mask> is the last id, as in BART


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


def pretrain(params: PlmParams, tokenizer, documents: list[str], device: torch.device | str = "cpu",
             checkpoint: Checkpoint | None = None):
    """Pretrain a new BART on `documents` with text infilling. Returns (model in eval mode, training record).
    With a `checkpoint`, a killed run resumes where it was (its epoch's batches, its place in them and the
    noise generator) and ends with the weights an uninterrupted run ends with."""
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
    optimization = Optimization(model, params.lr, params.weight_decay, params.warmup_steps, total,
                                max_grad_norm=params.max_grad_norm, betas=(0.9, 0.98), eps=1e-6)
    log.info("pretraining %s (%d parameters) on %d documents: %d epochs of %d steps (batch %d) on %s",
             EMBEDDED_NAME, sum(p.numel() for p in model.parameters()), len(encoded), params.epochs,
             steps_per_epoch, params.batch_size, device)
    noise = Noise(params.mask_ratio, params.poisson_lambda, params.answer_mask_share)
    step, loop = checkpoint.resume(model, optimization, device) if checkpoint else (0, {})
    if loop:
        rng.bit_generator.state = loop["rng"]
    answer_masked, epochs = loop.get("answer_masked", 0), EpochMeans.restored(loop.get("losses", {}))
    started = time.perf_counter()
    model.train()
    with progress(total, "plm", initial=step) as bar:
        for epoch in range(step // steps_per_epoch, params.epochs):
            batches = loop.get("batches") or length_batches(lengths, params.batch_size, rng)
            for position in range(step % steps_per_epoch, len(batches)):
                examples = [make_example(encoded[i], tokenizer, noise, rng) for i in batches[position]]
                answer_masked += sum(kind == "answers" for _, _, kind in examples)
                examples = [(source, target) for source, target, _ in examples]
                batch = {name: tensor.to(device) for name, tensor in collate(examples, tokenizer.pad_token_id).items()}
                loss = model(**batch).loss
                loss.backward()
                optimization.step()
                epochs.add({"loss": loss.item()})
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
                ended = position + 1 == len(batches)
                if ended:
                    log.info("epoch %d/%d: mean infilling loss %.4f", epoch + 1, params.epochs,
                             epochs.end_epoch()["loss"])
                if checkpoint and step % params.checkpoint_every == 0 and step < total:
                    checkpoint.save(step, model, optimization, {
                        "batches": None if ended else batches, "rng": rng.bit_generator.state,
                        "answer_masked": answer_masked, "losses": epochs.state()})
            loop = {}
    if checkpoint:
        checkpoint.remove()
    epoch_losses = epochs.of("loss")
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
