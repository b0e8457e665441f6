"""Batch prediction: images/s of `vlkd.inference.predict.predict` against the evaluation's own path on the same
model, images and question, and what `load_model` costs in a fresh process.

    .venv/bin/python benchmarks/predict.py [--images 200] [--question "What color is the circle?"]
                                           [--model data/model] [--params params.yaml] [--repeats 2] [--threads N]

Needs the embedded world's trained model (`make demo` or `dvc repro`): the packaged model `--model` if it
exists, else the parts params.yaml's evaluate section names (student, teacher, language model), packaged here
by hand as `vlkd package` lays them out. Either is copied into a temporary folder first, so a pipeline run
meanwhile cannot change the model under the benchmark. The images are the first `--images` evaluation
images of the world (data/world/images/eval), copied into a folder of their own. Against each other, each
in its own process (the model loaded before the clock starts; the images embedded from their files inside
it, no feature cache), called twice on the same images: the first call pays whatever a process initialises
lazily once, the second is the steady rate:

  predict            `predict(model, folder, output.parquet, task="vqa", mode="direct", question=...)`:
                     requests read from the folder, embedded and answered chunk by chunk, rows written;
  evaluate's path    what `vlkd evaluate` does for one direct-mode condition: `vlkd.evaluate.images.
                     image_features` (pack, embed, plus the blank image it always adds) -> the per-image
                     table -> `Generator.answers` over the same prompts (as `_vqa_mode`).

Both must give the same answer for every image (compared, and the run fails otherwise). Then `load_model`
cold: a fresh process imports vlkd.inference.model (timed), calls load_model once (timed: the cold call)
and once more (imports and lazy initialisation done); peak RSS after import and after loading (VmHWM); and,
as the floor, a process that only imports torch. "Cold" is the process, not the disk: the model's files were
just copied, so they are in the page cache. Nothing here contacts a network address.

On a 2-core machine that other jobs share, torch's default two threads spin-wait against them and the
seconds measure the other job (10x swings); `--threads 1` keeps the comparison stable there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model and tokenizer here is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROJECT = Path(__file__).resolve().parents[1]
WORLD_IMAGE = "{image_id:06d}.png"


# -- inputs, made in the parent process --------------------------------------------------------------------
def prepare(args, tmp: Path) -> dict:
    """The model (a packaged folder copied here), the images (a folder of their own) and the question."""
    from vlkd.config import load_params

    params = load_params(args.params)
    images = copy_images(params.synth.output / "images" / "eval", tmp / "images", args.images)
    model = tmp / "model"
    if args.model and (args.model / "vlkd-model.json").is_file():
        shutil.copytree(args.model, model)
    else:
        package_by_hand(params.evaluate, model)
    return {"tmp": str(tmp), "model": str(model), "images": str(images), "count": args.images, "threads": args.threads,
            "question": args.question, "questions_file": str(params.evaluate.benchmarks["vqa"].questions),
            "annotations_file": str(params.evaluate.benchmarks["vqa"].annotations)}


def copy_images(source: Path, folder: Path, count: int) -> Path:
    files = [source / WORLD_IMAGE.format(image_id=i) for i in range(count)]
    missing = [path for path in files if not path.is_file()]
    if missing:
        sys.exit(f"{len(missing)} of {count} world images missing (e.g. {missing[0]}); run `make demo` first or "
                 "pass fewer --images")
    folder.mkdir(parents=True)
    for path in files:
        shutil.copy2(path, folder / path.name)
    return folder


def package_by_hand(evaluate, folder: Path) -> None:
    """student/, teacher/, plm/ and vlkd-model.json (how evaluate asks, its modes, the identity load_model
    gives the parts), as `vlkd package` writes them."""
    from vlkd.inference.asking import Asking
    from vlkd.inference.identity import MODEL_RECORD
    from vlkd.inference.model import load_model

    for part, source in (("student", evaluate.student), ("teacher", evaluate.teacher), ("plm", evaluate.plm)):
        if not source.is_dir():
            sys.exit(f"{source} does not exist; run the embedded pipeline first (`make demo`)")
        shutil.copytree(source, folder / part)
    asking = Asking.of(evaluate)
    identity = load_model(folder / "student", "cpu", teacher=folder / "teacher", plm=folder / "plm",
                          asking=asking).identity
    (folder / MODEL_RECORD).write_text(json.dumps({"asking": asking.as_dict(), "vqa_modes": list(evaluate.vqa_modes),
                                                   "identity": identity}))


# -- one measurement, in its own process ------------------------------------------------------------------
def run_predict(spec: dict) -> dict:
    import pyarrow.parquet as pq

    from vlkd.inference.model import load_model
    from vlkd.inference.predict import predict

    use_threads(spec["threads"])
    model = load_model(spec["model"], "cpu")

    def call(number: int) -> tuple[float, list]:
        output = Path(spec["tmp"]) / f"predict-{spec['repeat']}-{number}.parquet"
        started = time.perf_counter()
        predict(model, Path(spec["images"]), output, task="vqa", mode="direct", question=spec["question"])
        seconds = time.perf_counter() - started
        return seconds, [row["answer"] for row in sorted(pq.read_table(output).to_pylist(), key=lambda r: r["id"])]

    return timed_twice(call)


def run_evaluate_path(spec: dict) -> dict:
    import torch

    from vlkd.config import BenchmarkSpec
    from vlkd.evaluate.images import image_features
    from vlkd.inference.answering import FeatureRows, Generator
    from vlkd.inference.model import load_model
    from vlkd.models.infill import fill_prompt

    use_threads(spec["threads"])
    model = load_model(spec["model"], "cpu")  # the same parts evaluate loads (student, teacher, language model)
    benchmark = BenchmarkSpec(task="vqa", images=Path(spec["images"]), image_pattern=WORLD_IMAGE,
                              questions=Path(spec["questions_file"]), annotations=Path(spec["annotations_file"]))
    image_ids = list(range(spec["count"]))
    prompts = [fill_prompt(model.asking.vqa_prompt, question=spec["question"])] * len(image_ids)

    def call(number: int) -> tuple[float, list]:
        cache = Path(spec["tmp"]) / f"evaluate-cache-{spec['repeat']}-{number}"  # empty: embedded in the clock
        started = time.perf_counter()
        features, blank = image_features(benchmark, image_ids, model.teacher, cache,
                                         model.student.config.prefix == "patch", "cpu")
        table = torch.stack([features[i] for i in image_ids] + [blank])  # as run._per_image_table
        answerer = Generator(model.student, model.language_model, model.asking, model.asking.vqa_max_new_tokens)
        answers = answerer.answers(prompts, FeatureRows(table, torch.arange(len(image_ids))), "evaluate's path")
        return time.perf_counter() - started, answers

    return timed_twice(call)


def use_threads(threads: int | None) -> None:
    """torch's CPU threads for a throughput case (the import cases keep torch's default: their clock is the import)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def timed_twice(call) -> dict:
    """The first call in the process (with whatever it sets up once) and a second one on the same images."""
    first, answers = call(1)
    second, again = call(2)
    return {"first": first, "second": second, "rows": len(answers), "answers": answers, "stable": answers == again}


def run_load(spec: dict) -> dict:
    started = time.perf_counter()
    from vlkd.inference.model import load_model

    imported = time.perf_counter() - started
    rss_imported = peak_rss_mib()
    started = time.perf_counter()
    load_model(spec["model"], "cpu")
    cold = time.perf_counter() - started
    rss_loaded = peak_rss_mib()
    started = time.perf_counter()
    load_model(spec["model"], "cpu")
    return {"import": imported, "cold": cold, "second": time.perf_counter() - started,
            "rss_imported": rss_imported, "rss_loaded": rss_loaded}


def run_import_torch(spec: dict) -> dict:
    """The floor under any load_model: a process that imports torch and nothing else."""
    started = time.perf_counter()
    import torch  # noqa: F401

    return {"import": time.perf_counter() - started}


CASES = {"predict": run_predict, "evaluate": run_evaluate_path, "load": run_load, "torch": run_import_torch}


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: getrusage's ru_maxrss carries the parent's peak over fork + exec)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def measure(spec: dict) -> dict:
    """Run one case in a fresh process; its time and peak RSS are its own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_measure", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=spec["tmp"])
    if done.returncode != 0:
        sys.exit(f"{spec['case']} measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- main --------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--question", default="What color is the circle?", help="asked of every image")
    parser.add_argument("--model", type=Path, default=PROJECT / "data" / "model",
                        help="a packaged model (default: data/model; else the parts params.yaml names)")
    parser.add_argument("--params", type=Path, default=PROJECT / "params.yaml")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each throughput case, alternating")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    return parser.parse_args()


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    args = parse_args()
    if args._measure:
        spec = json.loads(args._measure)
        print(json.dumps({**CASES[spec["case"]](spec), "rss_mib": peak_rss_mib()}))
        return
    print(f"load average before: {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vlkd-bench-predict-") as tmp:
        spec = prepare(args, Path(tmp))
        runs = {"predict": [], "evaluate": []}
        for repeat in range(args.repeats):  # alternating, so a change in the machine's load hits both alike
            for case in runs:
                print(f"{case} ({repeat + 1}/{args.repeats}) ...", flush=True)
                runs[case].append(measure({**spec, "case": case, "repeat": repeat}))
        print("load_model ...", flush=True)
        load = measure({**spec, "case": "load"})
        torch_only = measure({**spec, "case": "torch"})
    answers = {case: [r["answers"] for r in results] for case, results in runs.items()}
    identical = all(a == answers["predict"][0] for case in answers for a in answers[case]) and all(
        r["stable"] for results in runs.values() for r in results)
    print(f"\nload average after: {load_average()}; {platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch threads: {args.threads or 'default'}; {args.images} world images (64 x 64 PNG), question "
          f"{args.question!r}, direct mode, median of {args.repeats} run(s) each\n")
    print("| path | images | first call s | images/s | second call s | images/s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    names = {"predict": "`predict` (folder source, chunks of 512, Parquet out)",
             "evaluate": "evaluate's path (`image_features` + `Generator`)"}
    for case, results in runs.items():
        rows = results[0]["rows"]
        first, second = (statistics.median(r[key] for r in results) for key in ("first", "second"))
        print(f"| {names[case]} | {rows} | {first:.2f} | {rows / first:.1f} | {second:.2f} | {rows / second:.1f} | "
              f"{max(r['rss_mib'] for r in results):.0f} |")
    for case, results in runs.items():
        print(f"{case}, each run (first / second call): "
              + ", ".join(f"{r['first']:.2f} / {r['second']:.2f}" for r in results))
    print(f"\nanswers {'identical' if identical else 'DIFFERENT'} across paths and runs "
          f"({len(set(answers['predict'][0]))} distinct answers over {args.images} images)\n")
    print("| load_model, fresh process | seconds | peak RSS MiB |")
    print("|---|---:|---:|")
    print(f"| import torch alone (the floor, another process) | {torch_only['import']:.2f} | "
          f"{torch_only['rss_mib']:.0f} |")
    print(f"| import vlkd.inference.model | {load['import']:.2f} | {load['rss_imported']:.0f} |")
    print(f"| first load_model (cold) | {load['cold']:.2f} | {load['rss_loaded']:.0f} |")
    print(f"| second load_model (same process) | {load['second']:.2f} | {load['rss_mib']:.0f} |")
    if not identical:
        sys.exit("predict and evaluate's path gave different answers")


if __name__ == "__main__":
    main()
