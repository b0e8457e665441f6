"""Throughput and peak memory of the features stage against a plain one-image-at-a-time loop.

    .venv/bin/python benchmarks/features.py [--images 2000] [--model ViT-B-32] [--device auto]

Both measurements run in the same invocation, each in its own subprocess so that peak memory is its
own: the stage (`extract_features`: DataLoader workers decoding, batched forward, autocast on GPU)
and the baseline (decode, preprocess and encode image and caption one sample at a time). Weights are
random (none can be downloaded here), which does not change the cost. Shards come from the synthetic
world, downloaded for real on 127.0.0.1. The baseline runs on a subset (--baseline-images), since its
per-image rate is steady. Prints a markdown table and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_shards(workdir: Path, images: int) -> Path:
    from vlkd.config import DownloadParams, SynthParams
    from vlkd.corpus.download import download
    from vlkd.world.server import world_server
    from vlkd.world.synth import generate_world

    generate_world(workdir / "world", SynthParams(images=images, eval_images=2, shifted_images=1, text_scenes=10,
                                                  pretrain_images=0, image_size=96, port=free_port()))
    with world_server(workdir / "world" / "urls.parquet"):
        download(workdir / "world" / "urls.parquet", workdir / "shards",
                 DownloadParams(image_size=256, shard_size=500, processes=2))
    return workdir / "shards"


def save_random_teacher(model_name: str, folder: Path) -> Path:
    import open_clip

    from vlkd.models.teacher import save_checkpoint

    model = open_clip.create_model(model_name)
    return save_checkpoint(model, model_name, open_clip.get_model_config(model_name), folder)


def peak_memory_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def run_stage(args) -> dict:
    import torch

    from vlkd.data.feature_writer import Encoding, extract_features
    from vlkd.models.teacher import load_teacher

    teacher = load_teacher(args.model, args.checkpoint)
    params = Encoding(batch_size=args.batch_size, num_workers=args.workers, device=args.device, precision="auto",
                      image_tokens=False)
    started = time.perf_counter()
    summary = extract_features(Path(args.shards), Path(args.output), teacher, params)
    seconds = time.perf_counter() - started
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"images": summary["images"], "seconds": seconds, "device": summary["device"],
            "precision": summary["precision"], "gpu_mib": gpu}


def run_baseline(args) -> dict:
    import io

    import torch
    import torch.nn.functional as F  # noqa: N812
    from PIL import Image

    from vlkd.data.webdataset import iter_shard, list_shards
    from vlkd.models.teacher import load_teacher

    teacher = load_teacher(args.model, args.checkpoint)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model = teacher.model.to(device)
    count, started = 0, time.perf_counter()
    with torch.inference_mode():
        for tar in list_shards(Path(args.shards)):
            for sample in iter_shard(tar):
                image = teacher.preprocess(Image.open(io.BytesIO(sample.image)))[None].to(device)
                F.normalize(model.encode_image(image), dim=-1).cpu()
                F.normalize(model.encode_text(teacher.tokenizer([sample.caption]).to(device)), dim=-1).cpu()
                count += 1
                if count == args.baseline_images:
                    break
            if count == args.baseline_images:
                break
    seconds = time.perf_counter() - started
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"images": count, "seconds": seconds, "device": str(device), "precision": "fp32", "gpu_mib": gpu}


def measure(kind: str, args, shards: Path, checkpoint: Path, output: Path) -> dict:
    """Run one measurement in a fresh process; its peak RSS (and its workers') is its own."""
    command = [sys.executable, __file__, "--_measure", kind, "--shards", str(shards), "--checkpoint",
               str(checkpoint), "--output", str(output), "--model", args.model, "--device", args.device,
               "--batch-size", str(args.batch_size), "--workers", str(args.workers),
               "--baseline-images", str(args.baseline_images)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{kind} measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| run | device | precision | images | seconds | images/s | peak RSS MiB | peak GPU MiB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        gpu = f"{r['gpu_mib']:.0f}" if r["gpu_mib"] is not None else "-"
        lines.append(f"| {name} | {r['device']} | {r['precision']} | {r['images']} | {r['seconds']:.1f} | "
                     f"{r['images'] / r['seconds']:.1f} | {r['rss_mib']:.0f} | {gpu} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="shard images to embed")
    parser.add_argument("--baseline-images", type=int, default=300, help="images for the one-at-a-time loop")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--workdir", type=Path, help="keep shards and outputs here (default: a temp folder)")
    parser.add_argument("--_measure", choices=["stage", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args._measure:
        result = (run_stage if args._measure == "stage" else run_baseline)(args)
        print(json.dumps({**result, "rss_mib": peak_memory_mib()}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        shards = workdir / "shards" if (workdir / "shards").is_dir() else make_shards(workdir, args.images)
        checkpoint = save_random_teacher(args.model, workdir / "teacher")
        shutil.rmtree(workdir / "features", ignore_errors=True)  # a rerun must not find everything done
        stage = measure("stage", args, shards, checkpoint, workdir / "features")
        baseline = measure("baseline", args, shards, checkpoint, workdir / "unused")
    print(f"\nfeatures stage, {args.model} (random weights), {platform.machine()} with {os.cpu_count()} CPU cores, "
          f"batch {args.batch_size}, {args.workers} decode workers\n")
    print(table([("vlkd features (batched, DataLoader workers)", stage),
                 ("plain loop, one image at a time", baseline)]))
    ratio = (stage["images"] / stage["seconds"]) / (baseline["images"] / baseline["seconds"])
    print(f"\nthroughput ratio stage / plain loop: {ratio:.2f}x")


if __name__ == "__main__":
    main()
