"""Pretrain the embedded ViLT on image-caption pairs with ViLT's own objectives: image-text matching (ITM:
half of each batch pairs an image with another image's caption) and masked language modelling (MLM, on the
matched pairs only, BERT's 80/10/10 masking by transformers' collator). Seeded: two CPU runs give the same
weights."""

from __future__ import annotations

import io
import logging

import torch
from PIL import Image

from vlkd.config import VlmParams
from vlkd.models.vilt import PatchOrder, TextBatch, encode, pixel_values, tokenize
from vlkd.training import EpochMeans, Optimization, progress

log = logging.getLogger(__name__)


class Pretraining(torch.nn.Module):
    """ViltForMaskedLM (what is saved) and an ITM head on the pooler (used in pretraining only: the task heads
    read the pooler it trained)."""

    def __init__(self, masked_lm) -> None:
        super().__init__()
        self.masked_lm = masked_lm
        self.itm = torch.nn.Linear(masked_lm.config.hidden_size, 2)
        self.order = PatchOrder(masked_lm.vilt)

    def forward(self, text: TextBatch, pixels: torch.Tensor, mlm_labels: torch.Tensor, matched: torch.Tensor):
        encoded = encode(self.masked_lm.vilt, self.order, text, pixels)
        itm = torch.nn.functional.cross_entropy(self.itm(encoded.pooled), matched.long())
        scores = self.masked_lm.mlm_score(encoded.text)
        mlm = torch.nn.functional.cross_entropy(scores.flatten(0, 1), mlm_labels.flatten(), ignore_index=-100)
        return itm, mlm, encoded


def decode_images(images: list[bytes], processor, batch: int = 256) -> torch.Tensor:
    """[N, 3, S, S] pixel values of encoded images, as the processor prepares them."""
    chunks = []
    for start in range(0, len(images), batch):
        decoded = [Image.open(io.BytesIO(data)) for data in images[start:start + batch]]
        chunks.append(pixel_values(processor, decoded))
    return torch.cat(chunks)


def _batch(pixels, captions, index, generator, tokenizer, collator, params: VlmParams):
    """A batch: images with a caption of their own (matched) or of another image in the batch (half)."""
    count = len(index)
    matched = torch.rand(count, generator=generator) >= 0.5
    shift = int(torch.randint(1, max(2, count), (), generator=generator))
    partner = torch.where(matched, torch.arange(count), (torch.arange(count) + shift) % count)
    texts = []
    for row in partner.tolist():
        options = captions[int(index[row])]
        texts.append(options[int(torch.randint(len(options), (), generator=generator))])
    matched = matched | (index[partner] == index)  # a batch of one image matches itself
    text = tokenize(tokenizer, texts, params.max_length)
    special = (text.word_ids < 0).long()
    masked_ids, labels = collator.torch_mask_tokens(text.input_ids.clone(), special_tokens_mask=special)
    labels[~matched] = -100  # MLM only where the caption is the image's own
    text.input_ids = masked_ids
    return text, pixels[index], labels, matched


def pretrain(params: VlmParams, model: Pretraining, tokenizer, pixels: torch.Tensor, captions: list[tuple[str, ...]],
             device: torch.device) -> dict:
    """Train `model` in place on (pixels[i], captions[i]); returns the per-epoch losses."""
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=params.mlm_probability)
    generator = torch.Generator().manual_seed(params.seed)
    torch.manual_seed(params.seed)  # the collator's masking and ViLT's patch order draw from torch's global stream
    steps_per_epoch = max(1, len(pixels) // params.batch_size)
    total = steps_per_epoch * params.epochs
    optimization = Optimization(model, params.lr, params.weight_decay, min(params.warmup_steps, total // 10), total,
                                max_grad_norm=params.max_grad_norm)
    means = EpochMeans()
    model.to(device).train()
    bar = progress(total, "vlm pretraining")
    for _ in range(params.epochs):
        order = torch.randperm(len(pixels), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * params.batch_size:(step + 1) * params.batch_size]
            text, batch_pixels, labels, matched = _batch(pixels, captions, index, generator, tokenizer, collator,
                                                         params)
            itm, mlm, _ = model(text.to(device), batch_pixels.to(device), labels.to(device), matched.to(device))
            (itm + mlm).backward()
            optimization.step()
            means.add(dict(zip(("itm", "mlm"), torch.stack([itm, mlm]).tolist(), strict=True)))
            bar.update()
        log.info("vlm epoch %d: %s", len(means.means) + 1, means.end_epoch())
    bar.close()
    return {"epochs": means.means, "steps": total}


@torch.no_grad()
def heldout_metrics(params: VlmParams, model: Pretraining, tokenizer, pixels: torch.Tensor,
                    captions: list[tuple[str, ...]], device: torch.device) -> dict:
    """ITM accuracy (half the pairs mismatched) and MLM accuracy on the masked tokens of held-out pairs."""
    from transformers import DataCollatorForLanguageModeling

    if len(pixels) < 2:
        return {"skipped": "fewer than 2 held-out pairs"}
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=params.mlm_probability)
    generator = torch.Generator().manual_seed(params.seed + 1)
    torch.manual_seed(params.seed + 1)
    model.to(device).eval()
    itm_right = mlm_right = mlm_count = pairs = 0
    for start in range(0, len(pixels), params.batch_size):
        index = torch.arange(start, min(start + params.batch_size, len(pixels)))
        text, batch_pixels, labels, matched = _batch(pixels, captions, index, generator, tokenizer, collator, params)
        labels, matched = labels.to(device), matched.to(device)
        encoded = encode(model.masked_lm.vilt, model.order, text.to(device), batch_pixels.to(device))
        itm_right += int((model.itm(encoded.pooled).argmax(-1) == matched.long()).sum())
        predicted = model.masked_lm.mlm_score(encoded.text).argmax(-1)
        mlm_right += int(((predicted == labels) & (labels >= 0)).sum())
        mlm_count += int((labels >= 0).sum())
        pairs += len(index)
    return {"pairs": pairs, "itm_accuracy": round(itm_right / pairs, 4),
            "mlm_accuracy": round(mlm_right / max(1, mlm_count), 4), "mlm_tokens": mlm_count}

