"""Train the embedded teacher the way open_clip trains CLIP, at toy size: its own `ClipLoss` with the
model's learnable temperature (clamped at 100 as open_clip does), AdamW without weight decay on gains,
biases, embeddings and the temperature, warmup then cosine decay. Images are decoded in a DataLoader
with worker processes; with the same seed two runs on a CPU give identical weights (the sampler and the
workers' random streams come from one seeded generator, batches go to workers in a fixed order).

The training set is held in memory as encoded bytes: the embedded model is for the synthetic world and
small corpora; a real corpus calls for a pretrained teacher (`teacher.pretrained`). An undecodable sample
and a shard that cannot be read to its end are left out, counted and named in the training record.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from pathlib import Path

import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlkd.config import TeacherParams
from vlkd.data.webdataset import list_shards, read_pairs
from vlkd.errors import VlkdError
from vlkd.io import write_json_atomic
from vlkd.models.teacher import EMBEDDED_CONFIG, EMBEDDED_MODEL, save_checkpoint
from vlkd.training import EpochMeans, Optimization, autocast, progress, resolve_precision, worker_context

log = logging.getLogger(__name__)

WORKERS = 2  # DataLoader processes decoding training images
MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learnable temperature at 1/100
BAD_KEYS_LISTED = 100  # metrics.json lists at most this many bad sample keys (the count is exact)
# open_clip's train transform with a crop range near the whole image: captions name positions ("on the
# left", "above"), and a crop never flips, so relations stay true, but a small crop could move an object
# out of its third of the image or cut it away.
AUGMENTATION = {"scale": (0.9, 1.0)}


def embedded_config(image_size: int) -> dict:
    """The embedded model's open_clip config at `image_size` (teacher.image_size)."""
    config = json.loads(json.dumps(EMBEDDED_CONFIG))
    config["vision_cfg"]["image_size"] = image_size
    return config


def training_setup(image_size: int) -> dict:
    """What shapes the embedded model besides the params: a change here retrains it."""
    return json.loads(json.dumps({"model_config": embedded_config(image_size), "augmentation": AUGMENTATION,
                                  "max_logit_scale": MAX_LOGIT_SCALE}))


class _Pairs(Dataset):
    """Encoded images and their tokenized captions; decoding and the train transform run in the workers.
    An image with several captions (download.captions_col) is paired with one of them drawn anew each
    time, from the worker's seeded stream: more of what the captions say about the image gets learned."""

    def __init__(self, images: list[bytes], captions: list[tuple[str, ...]], tokenizer, transform) -> None:
        self.images, self.transform = images, transform
        self.tokens = tokenizer([text for texts in captions for text in texts])
        counts = torch.tensor([len(texts) for texts in captions])
        self.first, self.counts = torch.cumsum(counts, 0) - counts, counts

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        choice = int(torch.randint(int(self.counts[index]), ()))
        with Image.open(io.BytesIO(self.images[index])) as image:
            return self.transform(image.convert("RGB")), self.tokens[int(self.first[index]) + choice]


def create_embedded_model(config_dir: Path, device: torch.device, model_config: dict):
    """(model, train transform, val transform) of a freshly initialised embedded model; its config is
    written to `config_dir` and registered with open_clip."""
    config = config_dir / f"{EMBEDDED_MODEL}.json"
    write_json_atomic(config, model_config)
    open_clip.add_model_config(config)
    return open_clip.create_model_and_transforms(EMBEDDED_MODEL, device=device, aug_cfg=AUGMENTATION,
                                                 output_dict=True)


def seed_everything(seed: int) -> torch.Generator:
    """Python's, numpy's and torch's global streams (transformers' `set_seed`), and the generator that
    orders the batches and seeds the DataLoader's workers."""
    from transformers import set_seed  # imported here: transformers is slow to import

    set_seed(seed)
    return torch.Generator().manual_seed(seed)


def train_contrastive(params: TeacherParams, folder: Path, device: torch.device | str = "cpu",
                      shards: list[Path] | None = None, save: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train the embedded model on the shards; with `save`, write its checkpoint and config into
    `folder`. Returns the model (eval mode) and the training record for metrics.json."""
    device = torch.device(device)
    folder.mkdir(parents=True, exist_ok=True)
    shards = shards if shards is not None else list_shards(Path(params.shards))
    data = read_pairs(shards)
    images = data.images
    if len(images) < 2:
        raise VlkdError(f"only {len(images)} usable image(s) in {params.shards}; contrastive training needs at "
                        "least 2: run `vlkd download` or check --shards")
    generator = seed_everything(params.seed)
    model_config = embedded_config(params.image_size)
    model, transform, _ = create_embedded_model(folder, device, model_config)
    # The ResNet's convolutions in channels-last layout, the one oneDNN's (and cuDNN's) fastest kernels take
    # (docs/benchmarks.md, "One training step"). Only the memory layout changes, and only while training.
    model = model.to(memory_format=torch.channels_last)
    pairs = _Pairs(images, data.captions, open_clip.get_tokenizer(EMBEDDED_MODEL), transform)
    batch_size = min(params.batch_size, len(images))
    loader = DataLoader(pairs, batch_size=batch_size, shuffle=True,
                        drop_last=len(images) > batch_size, num_workers=WORKERS, generator=generator,
                        persistent_workers=WORKERS > 0, pin_memory=device.type == "cuda",
                        multiprocessing_context=worker_context(pairs, WORKERS))
    loss_fn = open_clip.loss.ClipLoss()
    total = params.epochs * len(loader)
    optimization = Optimization(model, params.lr, params.weight_decay, params.warmup_steps, total,
                                betas=(0.9, 0.98), eps=1e-6)
    precision = resolve_precision("auto", device)
    log.info("training %s on %d images from %d shard(s): %d epochs of %d steps (batch %d) on %s",
             EMBEDDED_MODEL, len(images), len(shards), params.epochs, len(loader), batch_size, device)
    started, step, seen, epochs = time.perf_counter(), 0, 0, EpochMeans()
    model.train()
    with progress(total, "teacher") as bar:
        for epoch in range(params.epochs):
            for batch_images, batch_tokens in loader:
                batch_images = batch_images.to(device, non_blocking=True, memory_format=torch.channels_last)
                batch_tokens = batch_tokens.to(device, non_blocking=True)
                with autocast(device, precision):
                    out = model(batch_images, batch_tokens)
                    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
                loss.backward()
                optimization.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                epochs.add({"loss": loss.item()})
                seen += len(batch_images)
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            log.info("epoch %d/%d: mean contrastive loss %.4f, temperature 1/%.1f", epoch + 1, params.epochs,
                     epochs.end_epoch()["loss"], model.logit_scale.exp().item())
    epoch_losses = epochs.of("loss")
    # Back to the layout every loaded teacher has, so this model embeds exactly as the saved checkpoint does.
    model = model.to(memory_format=torch.contiguous_format).eval()
    seconds = time.perf_counter() - started
    if save:
        save_checkpoint(model, EMBEDDED_MODEL, model_config, folder)
    record = {
        "loss_first_epoch": round(epoch_losses[0], 6),
        "loss_last_epoch": round(epoch_losses[-1], 6),
        "loss_per_epoch": [round(loss, 6) for loss in epoch_losses],
        "logit_scale": round(model.logit_scale.exp().item(), 4),
        "epochs": params.epochs,
        "steps": step,
        "train_images": len(images),
        "train_captions": len(pairs.tokens),
        "images_seen": seen,
        "bad_samples": {"count": len(data.bad), "keys": data.bad[:BAD_KEYS_LISTED]},
        "unreadable_shards": {"count": len(data.unreadable), "reasons": data.unreadable},
    }
    log.info("trained in %.1f s: loss %.3f -> %.3f, %d bad sample(s), %d unreadable shard(s)", seconds,
             epoch_losses[0], epoch_losses[-1], len(data.bad), len(data.unreadable))
    return model, record
