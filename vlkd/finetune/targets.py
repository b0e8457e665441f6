"""The frozen teacher's targets for a task's training split, computed once and cached in Parquet.

One row per training example: the teacher's image cells (its image tokens on their spatial grid, in the
joint embedding space) and image embedding, one embedding per word of the text (the mean of the word's
BPE tokens after the text tower's final norm and projection: the student's tokenizer splits words
otherwise, so words are where the two meet) and the text embedding, and the instance weight w(x): the
teacher's zero-shot confidence in the gold label (`confidence`). Everything is L2-normalised.

The file's metadata records the teacher's fingerprint and what the targets depend on. Targets of another
teacher stop the stage with one line (or are replaced, when asked); other inputs (a task file, the
candidate template, the temperature) recompute them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from vlkd.errors import VlkdError
from vlkd.finetune.clip_td import ve_confidence, vqa_confidence
from vlkd.finetune.tasks import Example
from vlkd.io import tmp_path_for
from vlkd.models.teacher import Teacher, token_grid_size
from vlkd.record import fingerprint

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass
class Targets:
    cells: torch.Tensor  # [N, G, D] image cells, row-major on a rows x columns grid
    grid: tuple[int, int]
    image: torch.Tensor  # [N, D]
    words: torch.Tensor  # [N, W, D], zero past each text's words
    word_counts: torch.Tensor  # [N]
    text: torch.Tensor  # [N, D]
    weight: torch.Tensor  # [N]: the teacher's confidence in the gold label
    row_of: dict[str, int]  # example id -> row


def load_or_compute(path: Path, teacher: Teacher, examples: list[Example], words: list[list[str]], kind: str,
                    labels: list[str], inputs: dict, replace_other_teachers: bool, device: torch.device,
                    batch_size: int) -> Targets:
    """The cached targets at `path` when they were made by this teacher from these inputs; otherwise
    computed and written there. `words[i]` are example i's words as the student's tokenizer splits them."""
    made_by = teacher.fingerprint.as_dict()
    key = fingerprint(inputs)
    if path.is_file():
        meta = json.loads(pq.read_schema(path).metadata[b"vlkd"])
        if meta["teacher"] != made_by and not replace_other_teachers:
            raise VlkdError(f"the targets in {path} were made by teacher {meta['teacher']['model']} (weights "
                            f"{meta['teacher']['weights_sha256'][:12]}), not by finetune.teacher "
                            f"{made_by['model']} (weights {made_by['weights_sha256'][:12]}); delete the file "
                            "or pass --replace-other-teachers")
        if meta["teacher"] == made_by and meta["inputs"] == key:
            log.info("teacher targets from %s", path)
            return _read(path)
    log.info("computing the teacher's targets for %d examples into %s", len(examples), path)
    columns = _compute(teacher, examples, words, kind, labels, inputs["candidate"], inputs["temperature"], device,
                       batch_size)
    _write(path, columns, {"format": FORMAT, "teacher": made_by, "inputs": key})
    return _read(path)


# -- the teacher's side ------------------------------------------------------------------------------------
@torch.inference_mode()
def _compute(teacher: Teacher, examples: list[Example], words: list[list[str]], kind: str, labels: list[str],
             candidate: str, temperature: float, device: torch.device, batch_size: int) -> dict:
    model = teacher.model.to(device)
    grid = token_grid_size(model.visual)
    if grid is None:
        raise VlkdError(f"teacher {teacher.fingerprint.model} has no spatial grid of image tokens; CLIP-TD's visual "
                        "targets need a ViT or a ModifiedResNet tower")
    images = sorted({example.image for example in examples})
    cells, pooled = {}, {}
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = torch.stack([teacher.preprocess(Image.open(path).convert("RGB")) for path in chunk]).to(device)
        image, image_cells = image_embeddings(model, batch, grid, teacher.embed_dim)
        for index, path in enumerate(chunk):
            cells[path], pooled[path] = image_cells[index], image[index]
    word_vectors, texts = [], []
    for start in range(0, len(examples), batch_size):
        vectors, text = word_embeddings(model, teacher.tokenizer, words[start:start + batch_size], device)
        word_vectors += vectors
        texts.append(text)
    text = torch.cat(texts)
    image = torch.stack([pooled[example.image] for example in examples])
    similarity = (image * text).sum(-1)
    if kind == "vqa":
        weight = vqa_confidence(model, teacher.tokenizer, examples, labels, candidate, image, temperature, device,
                                batch_size)
    else:
        weight = ve_confidence(examples, similarity, temperature)
    return {
        "id": [example.id for example in examples],
        "cells": [cells[example.image].flatten().tolist() for example in examples],
        "image": image.tolist(),
        "words": [vectors.flatten().tolist() for vectors in word_vectors],
        "word_count": [len(vectors) for vectors in word_vectors],
        "text": text.tolist(),
        "weight": weight.tolist(),
        "grid": [list(grid)] * len(examples),
    }


def image_embeddings(model, pixels: torch.Tensor, grid: tuple[int, int], embed_dim: int):
    """(image embedding [N, D], cells [N, rows*columns, D]), normalised. A ViT's patch tokens go through the
    tower's output projection (as MaskCLIP does), so cells and texts share one space."""
    pooled, tokens = model.visual(pixels)
    tokens = tokens[:, -grid[0] * grid[1]:]  # a ResNet's leading pooled token dropped
    if tokens.shape[-1] != embed_dim:
        tokens = tokens @ model.visual.proj
    return F.normalize(pooled.float(), dim=-1), F.normalize(tokens.float(), dim=-1)


def word_embeddings(model, tokenizer, words: list[list[str]], device: torch.device):
    """([W_i, D] per text, text embeddings [N, D]), normalised: each text's words encoded one by one
    (open_clip's SimpleTokenizer splits words the same way alone as in a sentence) and run through the text
    tower together, so a word's embedding is that of its tokens in context."""
    if not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "sot_token_id"):
        raise VlkdError("the teacher's tokenizer is not open_clip's SimpleTokenizer; CLIP-TD's word targets need "
                        "its per-word encoding (OpenAI and LAION CLIP models use it)")
    if not hasattr(model, "token_embedding"):
        raise VlkdError("the teacher's text tower is not CLIP's own transformer; CLIP-TD's word targets need it")
    context = tokenizer.context_length
    ids = torch.zeros(len(words), context, dtype=torch.long)
    spans = []
    for row, text_words in enumerate(words):
        tokens, text_spans = [tokenizer.sot_token_id], []
        for word in text_words:
            pieces = tokenizer.encode(word)
            if len(tokens) + len(pieces) > context - 1:
                break
            text_spans.append((len(tokens), len(tokens) + len(pieces)))
            tokens += pieces
        tokens.append(tokenizer.eot_token_id)
        ids[row, :len(tokens)] = torch.tensor(tokens)
        spans.append(text_spans)
    ids = ids.to(device)
    x = model.token_embedding(ids) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    projection = model.text_projection
    x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    text = x[torch.arange(len(words)), ids.argmax(-1)]  # the end token's, as open_clip pools
    vectors = [torch.stack([x[row, start:end].mean(0) for start, end in text_spans]) if text_spans
               else x.new_zeros(0, x.shape[-1]) for row, text_spans in enumerate(spans)]
    return [F.normalize(v.float(), dim=-1).cpu() for v in vectors], F.normalize(text.float(), dim=-1).cpu()


# -- the file --------------------------------------------------------------------------------------------
def _write(path: Path, columns: dict, meta: dict) -> None:
    schema = pa.schema([("id", pa.string()), ("cells", pa.list_(pa.float32())), ("image", pa.list_(pa.float32())),
                        ("words", pa.list_(pa.float32())), ("word_count", pa.int32()),
                        ("text", pa.list_(pa.float32())), ("weight", pa.float32()), ("grid", pa.list_(pa.int32()))],
                       metadata={"vlkd": json.dumps(meta, sort_keys=True)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), tmp)
    tmp.replace(path)


def _read(path: Path) -> Targets:
    table = pq.read_table(path)
    count = table.num_rows
    image = torch.from_numpy(np.stack(table["image"].to_numpy(zero_copy_only=False)))
    dim = image.shape[1]
    grid = tuple(table["grid"][0].as_py()) if count else (1, 1)
    cells = torch.from_numpy(np.stack(table["cells"].to_numpy(zero_copy_only=False))).view(count, -1, dim)
    word_counts = torch.tensor(table["word_count"].to_pylist())
    words = torch.zeros(count, int(word_counts.max()) if count else 0, dim)
    for row, flat in enumerate(table["words"].to_numpy(zero_copy_only=False)):
        words[row, :word_counts[row]] = torch.tensor(flat).view(-1, dim)
    text = torch.from_numpy(np.stack(table["text"].to_numpy(zero_copy_only=False)))
    row_of = {key: row for row, key in enumerate(table["id"].to_pylist())}
    return Targets(cells, grid, image, words, word_counts, text, torch.tensor(table["weight"].to_pylist()), row_of)
