"""The teacher stage: make the teacher folder the features stage reads.

    pretrained tag or file -> load it through open_clip to check it        (no training)
    nothing pretrained     -> train the embedded model contrastively on the shards
    either way             -> zero-shot retrieval on the held-out split -> manifest.json, metrics.json

The embedded model is trained the way open_clip trains CLIP, at toy size: its own `ClipLoss` with the
model's learnable temperature (clamped at 100 as open_clip does), AdamW without weight decay on gains,
biases, embeddings and the temperature, linear warmup then cosine decay. Images are decoded in a
DataLoader with worker processes; with the same seed two runs on a CPU give identical weights (the
sampler and the workers' random streams come from one seeded generator, batches go to workers in a
fixed order).

The training set is held in memory as encoded bytes: the embedded model is for the synthetic world and
small corpora; a real corpus calls for a pretrained teacher (`teacher.pretrained`).

The folder is built in `<output>.tmp` and renamed over `<output>`, so it is always either the old
teacher or the new one. A folder whose manifest records the same params, the same shard contents and
a weights file with the recorded sha256 is kept as it is.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlkd.config import TeacherParams
from vlkd.corpus.shard_reader import iter_shard, list_shards
from vlkd.errors import VlkdError
from vlkd.io import (
    params_record,
    project_root,
    remove_path,
    replace_folder,
    sha256_file,
    without_output,
    write_json_atomic,
)
from vlkd.models.teacher import (
    CHECKPOINT_NAME,
    EMBEDDED_CONFIG,
    EMBEDDED_MODEL,
    Teacher,
    is_checkpoint_file,
    load_teacher,
    save_checkpoint,
)
from vlkd.training import decay_groups, resolve_device, warmup_cosine

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
METRICS = "metrics.json"
WORKERS = 2  # DataLoader processes decoding training images
MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learnable temperature at 1/100
BAD_KEYS_LISTED = 100  # metrics.json lists at most this many bad sample keys (the count is exact)
# open_clip's train transform with a crop range near the whole image: captions name positions ("on the
# left", "above"), and a crop never flips, so relations stay true, but a small crop could move an object
# out of its third of the image or cut it away.
AUGMENTATION = {"scale": (0.9, 1.0)}
SOURCE_TAG = "open_clip pretrained tag"
SOURCE_FILE = "checkpoint file"
SOURCE_TRAINED = "trained on"


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------
def build_teacher(params: TeacherParams) -> dict:
    """Make `params.output` (manifest.json, metrics.json and, for the embedded model, its checkpoint and
    config) and return the manifest. An up-to-date folder is left alone."""
    output = Path(params.output)
    current = _up_to_date(output, params)
    if current is not None:
        log.info("teacher in %s is up to date (same params, inputs and weights); not rebuilt", output)
        return current
    _check_replaceable(output)
    device = resolve_device(params.device, "teacher.device")
    building = output.parent / (output.name + ".tmp")
    remove_path(building)
    building.mkdir(parents=True)
    try:
        manifest = _build(params, building, device)
    except BaseException:
        remove_path(building)
        raise
    replace_folder(building, output)
    _log_retrieval(output, read_json(output / METRICS)["retrieval"])
    return manifest


def _build(params: TeacherParams, building: Path, device: torch.device) -> dict:
    """Fill `building` with the teacher, its metrics and its manifest; returns the manifest."""
    metrics: dict = {}
    if params.pretrained is None:
        if params.model != EMBEDDED_MODEL:
            raise VlkdError(f"teacher.pretrained is null, which trains the embedded model {EMBEDDED_MODEL!r}, but "
                            f"teacher.model is {params.model!r}; set teacher.model: {EMBEDDED_MODEL} or give a "
                            "pretrained tag or checkpoint file")
        inputs = shard_inputs(Path(params.shards))
        shards = [Path(params.shards) / name for name in inputs]
        _, metrics["training"] = train_contrastive(params, building, device, shards=shards)
        setup = training_setup(params.image_size)
        pretrained, source = CHECKPOINT_NAME, f"{SOURCE_TRAINED} {params.shards}"
        teacher = load_teacher(EMBEDDED_MODEL, str(building / CHECKPOINT_NAME), device=device)
    else:
        inputs, setup = {}, {}
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
        "inputs": {"shards": inputs},
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


def resolve_teacher(folder: Path) -> tuple[str, str]:
    """(open_clip model name, pretrained tag or absolute checkpoint path) of a teacher folder."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise VlkdError(f"no teacher in {folder} ({MANIFEST} is missing); run `vlkd teacher` first or "
                        "pass --model and --pretrained")
    try:
        manifest = json.loads(path.read_text())
        model, pretrained, source = manifest["model"], manifest["pretrained"], manifest["source"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VlkdError(f"{path} is not a teacher manifest ({err}); run `vlkd teacher` again") from err
    if source == SOURCE_TAG:
        return model, pretrained
    return model, str(_checkpoint_path(path, source, pretrained))


def _checkpoint_path(manifest: Path, source: str, pretrained: str) -> Path:
    """The manifest's checkpoint file: a user's file inside a project is recorded relative to the project
    (as every manifest records paths), anything else relative to the teacher folder."""
    checkpoint = Path(pretrained)
    if checkpoint.is_absolute():
        return checkpoint
    root = project_root(manifest) if source == SOURCE_FILE else None
    return (root or manifest.parent).resolve() / checkpoint


def shard_inputs(folder: Path) -> dict[str, str]:
    """The complete shards to train on: tar path -> sha256, so refreshed shards retrain the teacher."""
    tars = list_shards(folder)
    if not tars:
        raise VlkdError(f"no complete shards in {folder}; run `vlkd download` first or check --shards")
    return {tar.name: sha256_file(tar) for tar in tars}


def embedded_config(image_size: int) -> dict:
    """The embedded model's open_clip config at `image_size` (teacher.image_size)."""
    config = json.loads(json.dumps(EMBEDDED_CONFIG))
    config["vision_cfg"]["image_size"] = image_size
    return config


def training_setup(image_size: int) -> dict:
    """What shapes the embedded model besides the params: a change here retrains it."""
    return json.loads(json.dumps({"model_config": embedded_config(image_size), "augmentation": AUGMENTATION,
                                  "max_logit_scale": MAX_LOGIT_SCALE}))


def _up_to_date(output: Path, params: TeacherParams) -> dict | None:
    manifest_path = output / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if without_output(manifest["params"]) != without_output(params_record(params, manifest_path)):
            return None
        if params.pretrained is None:
            if manifest["training_setup"] != training_setup(params.image_size):
                return None
            if manifest["inputs"]["shards"] != shard_inputs(Path(params.shards)):
                return None
            checkpoint = output / manifest["pretrained"]
            if not checkpoint.is_file() or sha256_file(checkpoint) != manifest["weights_sha256"]:
                return None
        elif manifest["source"] == SOURCE_FILE:
            checkpoint = _checkpoint_path(manifest_path, SOURCE_FILE, manifest["pretrained"])
            if not checkpoint.is_file() or sha256_file(checkpoint) != manifest["weights_sha256"]:
                return None
        # A tag: its file lives in open_clip's cache, where the tag pins it.
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.info("teacher manifest %s unreadable (%s); rebuilding", manifest_path, err)
        return None
    return manifest


# ---------------------------------------------------------------------------------------------------
# Training the embedded model
# ---------------------------------------------------------------------------------------------------
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


def read_pairs(shards: list[Path]) -> tuple[list[str], list[bytes], list[tuple[str, ...]], list[str]]:
    """(keys, encoded images, each image's captions, bad keys) of every shard; a sample whose image is
    missing or does not decode is a bad sample: counted, logged and left out."""
    keys, images, captions, bad = [], [], [], []
    for tar in shards:
        for sample in iter_shard(tar):
            problem = _decode_problem(sample.image)
            if problem:
                log.warning("skipping sample %s in %s: %s", sample.key, tar.name, problem)
                bad.append(sample.key)
                continue
            keys.append(sample.key)
            images.append(sample.image)
            captions.append(sample.captions)
    return keys, images, captions, bad


def _decode_problem(data: bytes | None) -> str | None:
    if data is None:
        return "no image in the shard"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        return f"image does not decode ({type(err).__name__}: {str(err)[:100]})"
    return None


def create_embedded_model(config_dir: Path, device: torch.device, model_config: dict):
    """(model, train transform, val transform) of a freshly initialised embedded model; its config is
    written to `config_dir` and registered with open_clip."""
    config = config_dir / f"{EMBEDDED_MODEL}.json"
    write_json_atomic(config, model_config)
    open_clip.add_model_config(config)
    return open_clip.create_model_and_transforms(EMBEDDED_MODEL, device=device, aug_cfg=AUGMENTATION,
                                                 output_dict=True)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def train_contrastive(params: TeacherParams, folder: Path, device: torch.device | str = "cpu",
                      shards: list[Path] | None = None, save: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train the embedded model on the shards; with `save`, write its checkpoint and config into
    `folder`. Returns the model (eval mode) and the training record for metrics.json."""
    device = torch.device(device)
    folder.mkdir(parents=True, exist_ok=True)
    shards = shards if shards is not None else list_shards(Path(params.shards))
    keys, images, captions, bad = read_pairs(shards)
    if len(images) < 2:
        raise VlkdError(f"only {len(images)} usable image(s) in {params.shards}; contrastive training needs at "
                        "least 2: run `vlkd download` or check --shards")
    generator = seed_everything(params.seed)
    model_config = embedded_config(params.image_size)
    model, transform, _ = create_embedded_model(folder, device, model_config)
    pairs = _Pairs(images, captions, open_clip.get_tokenizer(EMBEDDED_MODEL), transform)
    batch_size = min(params.batch_size, len(images))
    loader = DataLoader(pairs, batch_size=batch_size, shuffle=True,
                        drop_last=len(images) > batch_size, num_workers=WORKERS, generator=generator,
                        persistent_workers=WORKERS > 0, pin_memory=device.type == "cuda")
    loss_fn = open_clip.loss.ClipLoss()
    optimizer = torch.optim.AdamW(decay_groups(model, params.weight_decay), lr=params.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    total = params.epochs * len(loader)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    log.info("training %s on %d images from %d shard(s): %d epochs of %d steps (batch %d) on %s",
             EMBEDDED_MODEL, len(images), len(shards), params.epochs, len(loader), batch_size, device)
    started, step, epoch_losses, seen = time.perf_counter(), 0, [], 0
    model.train()
    with tqdm(total=total, desc="teacher", unit="step", disable=None) as bar:
        for epoch in range(params.epochs):
            losses = []
            for batch_images, batch_tokens in loader:
                for group in optimizer.param_groups:
                    group["lr"] = warmup_cosine(step, params.lr, params.warmup_steps, total)
                batch_images = batch_images.to(device, non_blocking=True)
                batch_tokens = batch_tokens.to(device, non_blocking=True)
                with autocast:
                    out = model(batch_images, batch_tokens)
                    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                losses.append(loss.item())
                seen += len(batch_images)
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
            epoch_losses.append(sum(losses) / len(losses))
            log.info("epoch %d/%d: mean contrastive loss %.4f, temperature 1/%.1f", epoch + 1, params.epochs,
                     epoch_losses[-1], model.logit_scale.exp().item())
    model.eval()
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
        "bad_samples": {"count": len(bad), "keys": bad[:BAD_KEYS_LISTED]},
    }
    log.info("trained in %.1f s: loss %.3f -> %.3f, %d bad sample(s)", seconds, epoch_losses[0],
             epoch_losses[-1], len(bad))
    return model, record


# ---------------------------------------------------------------------------------------------------
# Zero-shot retrieval on the held-out split
# ---------------------------------------------------------------------------------------------------
def read_coco_captions(path: Path, images_dir: Path) -> tuple[list[Path], list[set[str]], list[str]]:
    """(image files, each image's set of caption texts, the images that are missing) of a COCO captions
    file; an image without captions or without its file is left out."""
    try:
        coco = json.loads(path.read_text())
        texts: dict[int, set[str]] = defaultdict(set)
        for annotation in coco["annotations"]:
            texts[annotation["image_id"]].add(" ".join(str(annotation["caption"]).split()))
        files = {image["id"]: image["file_name"] for image in coco["images"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VlkdError(f"{path} is not a COCO captions file ({type(err).__name__}: {err}); check "
                        "teacher.eval_captions") from err
    paths, captions, missing = [], [], []
    for image_id, file_name in sorted(files.items()):
        if not texts.get(image_id):
            continue
        if not (images_dir / file_name).is_file():
            missing.append(file_name)
            continue
        paths.append(images_dir / file_name)
        captions.append(texts[image_id])
    return paths, captions, missing


@torch.no_grad()
def evaluate_retrieval(teacher: Teacher, images_dir: Path, captions_file: Path, device: torch.device | str = "cpu",
                       batch_size: int = 256) -> dict:
    """Zero-shot retrieval between the held-out images and the distinct texts of their captions.

    A hit is judged by text: captions are templated, so two images can share a caption text, and
    retrieving that text is right for both. image->text: the top-ranked texts hold one of the image's
    own; text->image: the top-ranked image has the text among its captions. Chance: the expected
    recall of a random ranking."""
    if not captions_file.is_file() or not images_dir.is_dir():
        missing = captions_file if not captions_file.is_file() else images_dir
        log.warning("retrieval not measured: %s does not exist (set teacher.eval_images / eval_captions)", missing)
        return {"skipped": f"{missing} does not exist"}
    paths, own, missing = read_coco_captions(captions_file, images_dir)
    if missing:
        log.warning("%d eval image(s) in %s are missing, e.g. %s; left out", len(missing), images_dir, missing[0])
    if not paths:
        log.warning("retrieval not measured: no eval image of %s found in %s", captions_file, images_dir)
        return {"skipped": f"no eval image of {captions_file} found in {images_dir}"}
    texts = sorted(set().union(*own))
    device = torch.device(device)
    model = teacher.model.to(device).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    image_features, text_features = [], []
    with autocast:
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([_load_eval_image(path, teacher.preprocess)
                                 for path in paths[start:start + batch_size]])
            image_features.append(_first(model.encode_image(batch.to(device))).float())
        for start in range(0, len(texts), batch_size):
            batch = teacher.tokenizer(texts[start:start + batch_size]).to(device)
            text_features.append(model.encode_text(batch).float())
    images = torch.nn.functional.normalize(torch.cat(image_features), dim=-1)
    words = torch.nn.functional.normalize(torch.cat(text_features), dim=-1)
    similarity = (images @ words.T).cpu()
    column = {text: j for j, text in enumerate(texts)}
    relevant = torch.zeros(len(paths), len(texts), dtype=torch.bool)  # [images, texts]
    for i, mine in enumerate(own):
        relevant[i, [column[text] for text in mine]] = True
    return {
        "images": len(paths),
        "texts": len(texts),
        "captions_file": str(captions_file),
        "missing_images": len(missing),
        "image_to_text": _recalls(similarity, relevant, (1, 5)),
        "text_to_image": _recalls(similarity.T, relevant.T, (1, 5)),
    }


def _first(output):
    return output[0] if isinstance(output, tuple | list) else output


def _load_eval_image(path: Path, preprocess) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            return preprocess(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise VlkdError(f"eval image {path} does not decode ({err}); regenerate the world or fix the file") from err


def _recalls(similarity: torch.Tensor, relevant: torch.Tensor, ks: tuple[int, ...]) -> dict:
    """Recall@k of ranking the columns for every row, and its chance level: the probability that k
    columns drawn at random hold at least one relevant one."""
    result = {"queries": similarity.shape[0], "gallery": similarity.shape[1]}
    n = similarity.shape[1]
    ranked = similarity.topk(min(max(ks), n), dim=1).indices
    counts = relevant.sum(dim=1).tolist()
    for k in ks:
        k_eff = min(k, n)
        hits = relevant.gather(1, ranked[:, :k_eff]).any(dim=1).float().mean().item()
        chance = sum(1 - _none_relevant(n, count, k_eff) for count in counts) / len(counts)
        result[f"recall@{k}"] = round(hits, 4)
        result[f"chance@{k}"] = round(chance, 4)
    return result


def _none_relevant(n: int, relevant: int, k: int) -> float:
    """Probability that k of n items drawn without replacement miss all `relevant` ones."""
    return math.comb(n - relevant, k) / math.comb(n, k) if n - relevant >= k else 0.0


# ---------------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------------


def _check_replaceable(output: Path) -> None:
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / MANIFEST).is_file())):
        raise VlkdError(f"{output} exists and is not a teacher folder (no {MANIFEST}); refusing to replace it: "
                        "choose another teacher output or remove it")


