"""Benchmark of the download stage against img2dataset's own entry point, on the synthetic world.

    /work/main/.venv/bin/python benchmarks/download.py [--images 2000] [--new-fraction 0.05] [--json out.json]

A world of images * (1 + new_fraction) training images is generated and served on 127.0.0.1. Two URL
lists sit next to its world.json: v1 (the first `images` rows) and v2 (all rows, the new ones appended).
Five runs, each in a fresh process so that its peak RSS is its own (ru_maxrss is a high-water mark):

    img2dataset full       img2dataset.download(v1) into an empty folder
    vlkd full              vlkd download(v1) into an empty folder
    vlkd refresh           vlkd download(v2) into the same folder: only the new rows are fetched
    vlkd no-op rerun       vlkd download(v2) again: nothing to fetch, the stage's fixed cost
    img2dataset refresh    img2dataset.download(v2) into an empty folder: the safe way to get the new rows
                           with img2dataset alone (its incremental mode keys on shard numbers and skips rows
                           that land in an already finished shard number)

Before them, two fixed costs that no row count changes are measured the same way, to show where a small
refresh's time goes: importing img2dataset (it pulls in torch through webdataset), and spawning one pool
worker that imports it, as img2dataset's multiprocessing distributor does for every run with rows to fetch.

Peak RSS is the largest single process of the run: the run's own process or one of img2dataset's spawned
workers, whichever is larger (not their sum). The table goes to stdout, logs to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import platform
import resource
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from vlkd.config import DownloadParams, SynthParams
from vlkd.corpus.download import download
from vlkd.world.server import serve_folder, world_server
from vlkd.world.synth import generate_world

log = logging.getLogger("benchmarks.download")

REFRESH_GOAL = 0.10  # a refresh with 5% new rows should cost at most this fraction of a full run
OUTPUTS = ("img2dataset-full", "vlkd", "img2dataset-refresh")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="rows of the first URL list (v1)")
    parser.add_argument("--new-fraction", type=float, default=0.05, help="rows added in v2, as a fraction of v1")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the world and the outputs (default: a temporary folder, removed at the "
                             f"end); its {', '.join(OUTPUTS)} subfolders are replaced")
    parser.add_argument("--port", type=int, default=None, help="port of the world's server (default: a free one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_world(world_dir: Path, images: int, port: int) -> Path:
    """A small synthetic world: `images` training images, and as few eval images and text scenes as allowed."""
    params = SynthParams(images=images, eval_images=10, shifted_images=5, text_scenes=100, image_size=96, port=port)
    generate_world(world_dir, params)
    return world_dir


def write_lists(world_dir: Path, images: int) -> tuple[Path, Path]:
    """v1 = the first `images` rows of the world's list, v2 = all of them; both next to world.json, so that
    the download stage serves the world itself and the world's server (which serves this folder) finds them."""
    table = pq.read_table(world_dir / "urls.parquet")
    v1, v2 = world_dir / "v1.parquet", world_dir / "v2.parquet"
    pq.write_table(table.slice(0, images), v1)
    pq.write_table(table, v2)
    return v1, v2


def timed(fn: Callable, *args) -> tuple[object, float, float]:
    """Run fn(*args) in a fresh process; returns (its result, wall seconds, peak RSS in MiB)."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_measure, args=(send, fn, args))
    process.start()
    send.close()
    outcome = receive.recv()
    process.join()
    if "error" in outcome:
        raise RuntimeError(f"{fn.__name__} failed in its process:\n{outcome['error']}")
    return outcome["result"], outcome["seconds"], outcome["peak_mib"]


def _measure(send, fn: Callable, args: tuple) -> None:
    os.dup2(2, 1)  # img2dataset prints its progress to stdout (in this process and its workers): stdout is the table's
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        started = time.perf_counter()
        result = fn(*args)
        seconds = time.perf_counter() - started
    except BaseException:
        send.send({"error": traceback.format_exc()})
        raise
    peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux
    send.send({"result": result, "seconds": seconds, "peak_mib": peak_kib / 1024})


def run_img2dataset(url_list: Path, output: Path, params: DownloadParams, port: int) -> int:
    """img2dataset's own entry point, with the world served around it; returns the rows attempted."""
    import img2dataset  # here, not at the top: img2dataset's workers re-import this script

    with serve_folder(url_list.parent, port):
        img2dataset.download(
            url_list=str(url_list), image_size=params.image_size, output_folder=str(output),
            processes_count=params.processes, thread_count=params.threads, resize_mode=params.resize_mode,
            output_format="webdataset", input_format="parquet", url_col="url", caption_col="caption",
            number_sample_per_shard=params.shard_size, extract_exif=False, timeout=params.timeout,
            distributor="multiprocessing",
        )
    return sum(json.loads(stats.read_text())["count"] for stats in output.glob("*_stats.json"))


def run_vlkd(url_list: Path, output: Path, params: DownloadParams) -> int:
    """The download stage; returns the rows it fetched in this run."""
    with world_server(url_list):
        return download(url_list, output, params)["this_run"]["fetched"]


def import_img2dataset() -> int:
    """What every img2dataset process pays first: importing it (with albumentations, cv2, fsspec...)."""
    import img2dataset  # noqa: F401

    return 0


def spawn_worker() -> int:
    """What a download with anything to fetch pays on top: a spawned pool worker that imports img2dataset
    (it unpickles the Downloader) and re-imports the main script, as img2dataset's distributor does."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(import_img2dataset)
    return 0


def measure_overheads() -> list[dict]:
    """Fixed costs that do not depend on the number of rows, each in a fresh process (after a warm-up import,
    so that no run pays for a cold file cache)."""
    timed(import_img2dataset)
    overheads = []
    for name, fn in (("import img2dataset", import_img2dataset), ("spawn 1 worker + its import", spawn_worker)):
        _, seconds, peak_mib = timed(fn)
        overheads.append({"what": name, "seconds": seconds, "peak_rss_mib": peak_mib})
    return overheads


def measure_all(v1: Path, v2: Path, workdir: Path, params: DownloadParams, port: int) -> list[dict]:
    for name in OUTPUTS:
        shutil.rmtree(workdir / name, ignore_errors=True)
    new_rows = pq.read_metadata(v2).num_rows - pq.read_metadata(v1).num_rows
    runs = [
        ("img2dataset full", run_img2dataset, (v1, workdir / "img2dataset-full", params, port), None),
        ("vlkd full", run_vlkd, (v1, workdir / "vlkd", params), None),
        ("vlkd refresh", run_vlkd, (v2, workdir / "vlkd", params), new_rows),
        ("vlkd no-op rerun", run_vlkd, (v2, workdir / "vlkd", params), 0),
        ("img2dataset refresh (full re-download)", run_img2dataset,
         (v2, workdir / "img2dataset-refresh", params, port), None),
    ]
    results = []
    for name, fn, args, expected in runs:
        log.info("run: %s", name)
        fetched, seconds, peak_mib = timed(fn, *args)
        if expected is not None:
            assert fetched == expected, f"{name}: fetched {fetched} rows, expected {expected}"
        results.append({"run": name, "fetched": fetched, "seconds": seconds, "peak_rss_mib": peak_mib})
    return results


def seconds_of(results: list[dict], name: str) -> float:
    return next(r["seconds"] for r in results if r["run"] == name)


def report(results: list[dict], overheads: list[dict], args: argparse.Namespace) -> dict:
    """Print the table and the ratios; returns them for --json."""
    print(f"machine: {os.cpu_count()} CPU(s), {platform.platform()}, Python {platform.python_version()}; "
          f"v1 = {args.images} rows, +{args.new_fraction:.0%} in v2; processes={args.processes}, "
          f"threads={args.threads}, shard size={args.shard_size}")
    print()
    print("| run | rows fetched | seconds | samples/s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        rate = f"{r['fetched'] / r['seconds']:.1f}" if r["fetched"] else "-"
        print(f"| {r['run']} | {r['fetched']} | {r['seconds']:.2f} | {rate} | {r['peak_rss_mib']:.0f} |")
    full_ratio = seconds_of(results, "vlkd full") / seconds_of(results, "img2dataset full")
    refresh_ratio = seconds_of(results, "vlkd refresh") / seconds_of(results, "vlkd full")
    met = "met" if refresh_ratio <= REFRESH_GOAL else "NOT met"
    print()
    print(f"vlkd full / img2dataset full: {full_ratio:.2f}")
    print(f"refresh / full run (vlkd): {refresh_ratio:.3f} (goal: at most {REFRESH_GOAL:.2f}; {met})")
    print()
    print("fixed costs, each in a fresh process: " + "; ".join(
        f"{o['what']} {o['seconds']:.2f} s ({o['peak_rss_mib']:.0f} MiB)" for o in overheads))
    return {"full_ratio": full_ratio, "refresh_ratio": refresh_ratio, "refresh_goal_met": refresh_ratio <= REFRESH_GOAL}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations asks the network
    args = parse_args()
    port = args.port or free_port()
    params = DownloadParams(image_size=64, processes=args.processes, threads=args.threads, shard_size=args.shard_size)
    with tempfile.TemporaryDirectory(prefix="vlkd-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        world = make_world(workdir / "world", math.ceil(round(args.images * (1 + args.new_fraction), 6)), port)
        log.info("world of %d images in %.1f s", pq.read_metadata(world / "urls.parquet").num_rows,
                 time.perf_counter() - started)
        v1, v2 = write_lists(world, args.images)
        overheads = measure_overheads()
        results = measure_all(v1, v2, workdir, params, port)
    ratios = report(results, overheads, args)
    log.info("benchmark took %.0f s in all", time.perf_counter() - started)
    if args.json:
        machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": results, "fixed_costs": overheads, **ratios}, indent=2) + "\n")


if __name__ == "__main__":  # img2dataset's spawned workers re-import this script: no work at import time
    main()
