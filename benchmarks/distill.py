"""Distillation throughput and peak memory: stored teacher features against a teacher run on the fly.

    .venv/bin/python benchmarks/distill.py [--teacher-model ViT-B-32] [--steps 20] [--batch-size 64]
                                           [--device auto|cpu|cuda] [--peak-tflops 989]

CLIP is frozen in VLKD, so the features stage computes its embeddings once and `vlkd distill` reads them
from Parquet. This measures what that buys. Both variants run the same training step, the real one of
`vlkd.distill.train` (`_train_step`: tokenization, span noising, TTDM + ITCL + ICTI forward and backward
through `VlkdObjective`; then gradient clipping, AdamW and the schedule, as `_distill` does); they differ
only in where a batch's teacher embeddings come from:

  stored      `FeatureBatches` over the feature store (what `vlkd distill` does);
  on the fly  the design the store replaces: decode the shard images, preprocess them and run
              `encode_image` / `encode_text` under no_grad for every batch.

Each variant runs in its own subprocess, so its peak RSS is its own. The teacher is by default the
project's embedded one (data/teacher, with data/features and data/shards); `--teacher-model ViT-B-32`
uses a randomly initialised open_clip model instead (no weights can be downloaded here, and random weights
cost the same), which shows the realistic gap where CLIP is the expensive part. Its stored features are
first extracted, with `extract_features`, from the images the on-the-fly variant decodes: the first
`--images` of the shards, rewritten into one shard per decode worker (a worker reads whole shards).
The student is the language model in data/plm, or, when there is none, a randomly initialised BART of
the embedded language model's size with a byte-level BPE tokenizer trained on the shard captions.

On CUDA (or with `--mfu`) a third run trains a BART-base-sized student (d_model 768, 6 + 6 layers,
12 heads, ffn 3072, vocabulary 50265, random init) from the stored features and reports its model
FLOPs utilisation, MFU = 6 x trainable parameters x caption tokens per second / peak bf16 FLOP/s
(H100 SXM dense bf16: 989 TFLOP/s). A caption token is counted once, though the step runs the encoder
on it twice (TTDM/ITCL's text pass and ICTI's noised pass): for BART-base the true count is about 30%
higher, so this MFU is conservative. The goal is at least 40%. Nothing here contacts a network address.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model and tokenizer here is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
BART_BASE = dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, vocab_size=50265)
RANDOM_SEED = 0  # the random teacher's weights: the same in the extraction and the on-the-fly run


# -- inputs, made in the parent process --------------------------------------------------------------------
def subset_shards(shards: Path, folder: Path, images: int, per_shard: int) -> Path:
    """The first `images` samples of `shards`, rewritten as complete shards of `per_shard` samples each
    (one decode worker reads one shard at a time, so several shards keep several workers busy)."""
    from vlkd.data.webdataset import iter_shard, list_shards

    folder.mkdir(parents=True)
    samples = list(itertools.islice((s for tar in list_shards(shards) for s in iter_shard(tar)), images))
    for shard_id, start in enumerate(range(0, len(samples), per_shard)):
        chunk = samples[start:start + per_shard]
        with tarfile.open(folder / f"{shard_id:05d}.tar", "w") as out:
            for sample in chunk:
                for extension, data in (("jpg", sample.image), ("txt", sample.caption.encode())):
                    member = tarfile.TarInfo(f"{sample.key}.{extension}")
                    member.size = len(data)
                    out.addfile(member, io.BytesIO(data))
        (folder / f"{shard_id:05d}_stats.json").write_text(json.dumps({"count": len(chunk)}))
    return folder


def random_teacher(model_name: str, device: str = "cpu"):
    """A randomly initialised open_clip model (seeded) wrapped as a vlkd Teacher."""
    import open_clip
    import torch

    from vlkd.models.teacher import Fingerprint, Teacher

    torch.manual_seed(RANDOM_SEED)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    model = model.to(device).eval().requires_grad_(False)
    size = model.visual.image_size
    return Teacher(model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(model_name),
                   fingerprint=Fingerprint(model_name, f"random-seed-{RANDOM_SEED}", open_clip.__version__),
                   embed_dim=open_clip.get_model_config(model_name)["embed_dim"],
                   image_size=size[0] if isinstance(size, tuple | list) else size)


def extract_random_features(model_name: str, shards: Path, output: Path, device: str, workers: int) -> Path:
    import torch

    from vlkd.data.feature_writer import Encoding, extract_features

    params = Encoding(batch_size=64, num_workers=workers, device=device, precision="auto", image_tokens=False)
    extract_features(shards, output, random_teacher(model_name), params)
    if device == "cuda":
        torch.cuda.empty_cache()  # the measurements get the GPU to themselves
    return output


def make_small_plm(folder: Path, shards: Path) -> Path:
    """A byte-level BPE tokenizer trained on the shard captions and a random BART of the embedded
    language model's size (PlmParams' defaults), as `vlkd plm` would leave it (untrained)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    from vlkd.config import PlmParams
    from vlkd.data.webdataset import iter_shard, list_shards

    captions = [sample.caption for tar in list_shards(shards) for sample in iter_shard(tar)]
    sizes = PlmParams()
    folder.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions, vocab_size=sizes.vocab_size, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "BartTokenizer"}')
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tokenizer), d_model=sizes.d_model, encoder_layers=sizes.layers,
                        decoder_layers=sizes.layers, encoder_attention_heads=sizes.heads,
                        decoder_attention_heads=sizes.heads, encoder_ffn_dim=sizes.ffn_dim,
                        decoder_ffn_dim=sizes.ffn_dim, max_position_embeddings=sizes.max_positions,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                        forced_bos_token_id=0)
    BartForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- one measurement, in its own process ------------------------------------------------------------------
def build_student(spec: dict, params, store, device):
    """The student `vlkd distill` builds (`build_student`), or one with a BART-base-sized language model."""
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    from vlkd.distill.start import build_student as stage_student
    from vlkd.models.student import Student, StudentConfig

    if spec["student"] == "plm":
        return stage_student(params, store, None).to(device)
    tokenizer = AutoTokenizer.from_pretrained(params.plm)  # its ids fit in BART-base's vocabulary
    bart = BartForConditionalGeneration(BartConfig(**BART_BASE, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                                   decoder_start_token_id=2, forced_bos_token_id=0))
    config = StudentConfig(teacher=store.teacher, embed_dim=store.embed_dim, visual_width=store.embed_dim)
    return Student(bart, tokenizer, config).to(device)


def stored_batches(batches):
    """FeatureBatches' epochs one after the other, as `_distill` opens them."""
    for epoch in itertools.count():
        yield from batches.epoch(epoch)


def on_the_fly_batches(spec: dict, batch_size: int, workers: int, device):
    """Shard images decoded and preprocessed (in DataLoader workers if any) and the teacher's
    embeddings computed for every batch: the batch `_train_step` expects, with no feature store."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch.utils.data import DataLoader

    from vlkd.data.feature_writer import ShardBatches
    from vlkd.data.webdataset import list_shards
    from vlkd.models.teacher import load_teacher

    if spec["teacher_model"]:
        teacher = random_teacher(spec["teacher_model"], device)
    else:
        teacher = load_teacher(spec["teacher_name"], spec["teacher_checkpoint"], device)
    model = teacher.model.to(device)
    dataset = ShardBatches(list_shards(Path(spec["shards"])), teacher.preprocess, teacher.tokenizer, batch_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    for _ in itertools.count():
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                            prefetch_factor=4 if workers else None)
        for shard_batch in loader:
            if len(shard_batch.keys) < batch_size:  # a shard's last, short batch
                continue
            with torch.no_grad(), autocast:
                image = model.encode_image(shard_batch.images.to(device, non_blocking=True))
                text = model.encode_text(shard_batch.tokens.to(device, non_blocking=True))
            yield {"key": shard_batch.keys, "caption": shard_batch.captions,
                   "image_embedding": F.normalize(image.float(), dim=-1),
                   "text_embedding": F.normalize(text.float(), dim=-1)}


def recording(batches, captions: list[str], waits: list[float], device):
    """Pass batches through, keeping their captions (tokens are counted after the clock stops) and the
    seconds spent producing each (on CUDA up to the end of the teacher's kernels)."""
    batches = iter(batches)
    while True:
        started = time.perf_counter()
        batch = next(batches)
        synchronize(device)
        waits.append(time.perf_counter() - started)
        captions.extend(batch["caption"])
        yield batch


def run_variant(spec: dict) -> dict:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from vlkd.config import DistillParams
    from vlkd.data.feature_store import FeatureStore
    from vlkd.distill.data import FeatureBatches
    from vlkd.distill.objective import Ranks, VlkdObjective, train_step
    from vlkd.training import decay_groups, resolve_precision

    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    work = Path(spec["workdir"])
    params = DistillParams(features=Path(spec["features"]), kept=None, plm=Path(spec["plm"]), output=work / "student",
                           checkpoints=work / "ckpt", plots=work / "plots", batch_size=spec["batch_size"],
                           device=spec["device"], compile=spec["compile"])
    ranks = Ranks(0, 1, device)
    store = FeatureStore(params.features)
    torch.manual_seed(params.seed)
    student = build_student(spec, params, store, device)
    student.train()
    objective = VlkdObjective(student, params, ranks)
    if params.compile:
        objective = torch.compile(objective)
    optimizer = torch.optim.AdamW(decay_groups(student, params.weight_decay), lr=params.lr)
    total = spec["warmup"] + spec["steps"]
    scheduler = get_cosine_schedule_with_warmup(optimizer, params.warmup_steps, total)
    precision = resolve_precision(params.precision, device)  # bf16 autocast on CUDA, fp32 on the CPU

    if spec["variant"] == "on_the_fly":
        source = on_the_fly_batches(spec, params.batch_size, spec["workers"], device)
    else:
        source = stored_batches(FeatureBatches(store, ["image_embedding", "text_embedding"], params.batch_size,
                                               params.seed))
    captions: list[str] = []
    waits: list[float] = []
    data = recording(source, captions, waits, device)
    started = 0.0
    for step in range(total):
        if step == spec["warmup"]:
            synchronize(device)
            captions.clear()
            waits.clear()
            started = time.perf_counter()
        losses = train_step(objective, student, data, None, None, params, ranks, step, precision)
        if not all(math.isfinite(value) for value in losses.values()):
            raise SystemExit(f"the loss is not finite at step {step}: {losses}")
        torch.nn.utils.clip_grad_norm_(student.parameters(), params.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = time.perf_counter() - started
    data.close()
    source.close()  # shuts DataLoader workers down, so their peak RSS is counted below
    tokens = sum(len(ids) for ids in student.tokenizer(captions, truncation=True,
                                                        max_length=params.max_length).input_ids)
    return {"samples": spec["steps"] * params.batch_size, "seconds": seconds, "tokens": tokens,
            "batch_size": params.batch_size, "batch_ms": 1000 * sum(waits) / len(waits),
            "device": str(device), "precision": "bf16 autocast" if precision == "bf16" else precision,
            "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
            "gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            "final_loss": round(losses["loss"], 4)}


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mib() -> float:
    """This process's peak RSS, or its DataLoader workers' (joined) if higher. VmHWM, not getrusage's
    ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child would report at least the
    parent's peak (here: whatever the parent's feature extraction used)."""
    status = Path("/proc/self/status").read_text()
    own_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own_kib, children_kib) / 1024


def measure(spec: dict) -> dict:
    """Run one variant in a fresh process; its peak RSS is its own."""
    command = [sys.executable, __file__, "--_measure", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{spec['variant']} measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- report ------------------------------------------------------------------------------------------------
def rate(result: dict) -> float:
    return result["samples"] / result["seconds"]


def throughput_table(rows: list[tuple[str, dict]]) -> str:
    gpu = any(r["gpu_mib"] is not None for _, r in rows)
    header = "| variant | samples/s | ms/step | of which batch ms | peak RSS MiB |"
    lines = [header + (" peak GPU MiB |" if gpu else ""), "|---|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for name, r in rows:
        step_ms = 1000 * r["seconds"] * r["batch_size"] / r["samples"]
        cells = f"| {name} | {rate(r):.1f} | {step_ms:.0f} | {r['batch_ms']:.1f} | {r['rss_mib']:.0f} |"
        lines.append(cells + (f" {r['gpu_mib']:.0f} |" if gpu else ""))
    return "\n".join(lines)


def mfu_table(result: dict, peak_tflops: float, batch_size: int) -> str:
    tokens_per_s = result["tokens"] / result["seconds"]
    flops = 6 * result["trainable_parameters"] * tokens_per_s
    return "\n".join([
        "| student | trainable params | batch | samples/s | caption tokens/s | model TFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| BART-base size, stored features | {result['trainable_parameters'] / 1e6:.1f}M | {batch_size} | "
        f"{rate(result):.1f} | {tokens_per_s:.0f} | {flops / 1e12:.2f} | {100 * flops / (peak_tflops * 1e12):.1f}% |",
    ])


# -- main --------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-model", help="an open_clip architecture with random weights, e.g. ViT-B-32 "
                        "(default: the embedded teacher in --teacher, with --features)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workers", type=int, help="decode workers of the on-the-fly variant "
                        "(default: 0 on CPU, where the cores train; min(8, cores) on CUDA)")
    parser.add_argument("--images", type=int, help="shard images the on-the-fly variant decodes, and "
                        "--teacher-model's features are made of (default: (warmup + steps) x batch size)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; on a CPU shared "
                        "with other work, 1 avoids threads waiting on each other)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the objective (distill.compile)")
    parser.add_argument("--mfu", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure a BART-base-sized student's MFU (default: on CUDA only)")
    parser.add_argument("--mfu-batch-size", type=int, default=256)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s of the GPU")
    parser.add_argument("--shards", type=Path, default=ROOT / "data" / "shards")
    parser.add_argument("--features", type=Path, default=ROOT / "data" / "features")
    parser.add_argument("--teacher", type=Path, default=ROOT / "data" / "teacher")
    parser.add_argument("--plm", type=Path, default=ROOT / "data" / "plm",
                        help="language model folder (default data/plm; if absent, a small random one)")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    return parser.parse_args()


def resolve_device(requested: str) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no CUDA device")
    return "cuda" if requested != "cpu" and torch.cuda.is_available() else "cpu"


def prepare(args, device: str, tmp: Path) -> dict:
    """Paths and names both variants share: shards, stored features, teacher, language model."""
    from vlkd.data.feature_store import FeatureStore
    from vlkd.models.teacher import resolve_teacher

    spec = {"device": device, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
            "compile": args.compile, "threads": args.threads, "teacher_model": args.teacher_model,
            "student": "plm",
            "workers": args.workers if args.workers is not None else (min(8, os.cpu_count() or 1)
                                                                      if device == "cuda" else 0)}
    # The images the on-the-fly variant decodes, in as many shards as it has decode workers.
    steps = args.warmup + args.steps
    images = args.images or steps * args.batch_size
    per_shard = args.batch_size * math.ceil(steps / max(1, spec["workers"]))
    spec["shards"] = str(subset_shards(args.shards, tmp / "shards", images, per_shard))
    if args.teacher_model:
        print(f"extracting {args.teacher_model} (random weights) features of {images} images ...", flush=True)
        features = extract_random_features(args.teacher_model, Path(spec["shards"]), tmp / "features", device,
                                           spec["workers"])
        spec["features"] = str(features)
    else:
        name, checkpoint = resolve_teacher(args.teacher)
        if not Path(checkpoint).is_file():  # a pretrained tag: loading it could mean a download
            sys.exit(f"the teacher in {args.teacher} is the pretrained tag {checkpoint!r}, not a local file; "
                     "use --teacher-model")
        if FeatureStore(args.features).teacher["model"] != name:
            sys.exit(f"{args.features} was not made by the teacher in {args.teacher}; run `vlkd features`")
        spec.update(features=str(args.features), teacher_name=name, teacher_checkpoint=checkpoint)
    plm = args.plm if (args.plm / "config.json").is_file() else make_small_plm(tmp / "plm", args.shards)
    spec.update(plm=str(plm), workdir=str(tmp / "run"))
    return spec


def main() -> None:
    args = parse_args()
    if args._measure:
        result = run_variant(json.loads(args._measure))
        print(json.dumps({**result, "rss_mib": peak_rss_mib()}))
        return
    device = resolve_device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the parent's feature extraction
    with tempfile.TemporaryDirectory(prefix="vlkd-bench-distill-") as tmp:
        spec = prepare(args, device, Path(tmp))
        stored = measure({**spec, "variant": "stored"})
        on_the_fly = measure({**spec, "variant": "on_the_fly"})
        mfu = None
        if args.mfu if args.mfu is not None else device == "cuda":
            mfu = measure({**spec, "variant": "stored", "student": "bart-base", "batch_size": args.mfu_batch_size})
    teacher = f"{args.teacher_model} (random weights)" if args.teacher_model else f"embedded ({args.teacher})"
    student = str(args.plm) if spec["plm"] == str(args.plm) else "random BART of the embedded size"
    print(f"\ndistillation, teacher {teacher}, student {student} ({stored['trainable_parameters'] / 1e6:.1f}M "
          f"trainable), {platform.machine()} with {os.cpu_count()} CPU cores, device {device} "
          f"({stored['precision']}), batch {args.batch_size}, {args.steps} timed steps after {args.warmup}, "
          f"{spec['workers']} decode workers on the fly, {args.threads or 'default'} torch threads\n")
    print(throughput_table([("stored features (FeatureBatches)", stored),
                            ("teacher on the fly (decode + encode each step)", on_the_fly)]))
    print(f"\nstored / on the fly: {rate(stored) / rate(on_the_fly):.2f}x samples/s, "
          f"{stored['rss_mib'] / on_the_fly['rss_mib']:.2f}x peak RSS")
    if mfu is not None:
        print(f"\nmodel FLOPs utilisation, peak {args.peak_tflops:g} TFLOP/s bf16 (goal: at least 40%; "
              f"{mfu['precision']})\n")
        print(mfu_table(mfu, args.peak_tflops, args.mfu_batch_size))


if __name__ == "__main__":
    main()
