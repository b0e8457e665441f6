"""The filter on a world as noisy as the web: how well each rule finds the noise it is for, and what the
student gains from training on the kept rows rather than on every row, at the same number of steps.

    python benchmarks/noisy_world.py --workdir /tmp/noisy [--seeds 0 1 2] [--set filter.semdedup_eps=0.01 ...]

In `--workdir` it writes a params.yaml (the world's recipe, configs/embedded.yaml, with the noisy world's
shares of configs/embedded-noisy.yaml), and runs, with the project's own `vlkd` commands:
  synth -> download -> features -> filter        the noisy corpus and its kept rows
  then for each seed: distill on the kept rows and on every row (the same `distill.max_steps`: the steps
  the unfiltered corpus takes in `distill.epochs`), and evaluate each student with its controls.
The teacher and the language model are the project's (`--project`, default this one): the noise touches only
the training corpus, and those two never read it (the teacher trains on the world's own pretraining pairs,
the language model on the world's text), so they are the ones a run of the noisy recipe would build.

Scores the filter's rules against the world's record of its noise (noise.parquet: every noisy row and its
kind), joined on the URL through the shards' metadata, and prints two tables: each rule's catch (rows
dropped, how many were noise, of its own kind) and each kind of noise's recall; then the students' scores
(mean and spread over seeds, the paired difference with a 95% t-interval). Everything is written to
`results.json` in the workdir; a finished step is not run again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import yaml

PROJECT = Path(__file__).resolve().parents[1]
# What each rule is meant to catch among the world's kinds of noise.
TARGETS = {"low_clip_score": "mismatched_caption", "boilerplate_caption": "boilerplate_caption",
           "caption_too_short": "boilerplate_caption", "language": "boilerplate_caption",
           "image_too_small": "small_image", "extreme_aspect_ratio": "small_image",
           "exact_duplicate": "exact_duplicate", "near_duplicate": "near_duplicate"}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
SCORES = (("vqa", "direct"), ("vqa", "describe"), ("vqa-shifted", "direct"), ("captions", None))
CONTROLS = ("blank", "shuffled", "text_only", "prior")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--project", type=Path, default=PROJECT, help="where the teacher and language model are")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], help="section.key=value overrides (YAML values)")
    parser.add_argument("--corpus-only", action="store_true", help="stop after the filter's scores")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    params = write_params(work, args.project.resolve(), args.set)
    vlkd(work, "params.yaml", "synth")
    for stage in ("download", "features", "filter"):
        vlkd(work, "params.yaml", stage, "--metrics", f"metrics/{stage}.json",
             *(["--replace-other-teachers"] if stage == "features" else []))
    results = {"filter": json.loads((work / "metrics/filter.json").read_text()), "rules": score_rules(work, params)}
    print_rules(results["rules"])
    if not args.corpus_only:
        steps = params["distill"]["epochs"] * (results["filter"]["rows"] // params["distill"]["batch_size"])
        results["students"] = train_students(work, params, args.seeds, steps)
        results["max_steps"] = steps
        print_students(results["students"], args.seeds)
    (work / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def write_params(work: Path, project: Path, overrides: list[str]) -> dict:
    params = yaml.safe_load((PROJECT / "configs/embedded.yaml").read_text())
    noisy = yaml.safe_load((PROJECT / "configs/embedded-noisy.yaml").read_text())
    params["synth"].update(noisy["synth"])
    teacher, plm = str(project / "data/teacher"), str(project / "data/plm")
    params["features"]["teacher"] = params["evaluate"]["teacher"] = teacher
    params["distill"]["plm"] = params["evaluate"]["plm"] = plm
    params["distill"]["init"] = None
    for assignment in overrides:
        key, value = assignment.split("=", 1)
        section, name = key.split(".", 1)
        params[section][name] = yaml.safe_load(value)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def vlkd(work: Path, params_file: str, *args: str) -> None:
    print("$ vlkd", params_file, " ".join(args), flush=True)
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    subprocess.run([sys.executable, "-m", "vlkd.cli", "--params", params_file, *args], cwd=work, env=env, check=True)


def score_rules(work: Path, params: dict) -> dict:
    """Each rule's dropped rows by kind of noise, and each kind's recall, from noise.parquet."""
    noise = {row["url"]: row["noise"] for row in pq.read_table(work / "data/world/noise.parquet").to_pylist()}
    url_of = {}
    for meta in sorted((work / params["download"]["output"]).glob("[0-9]*.parquet")):  # not failed.parquet
        for row in pq.read_table(meta, columns=["key", "url"]).to_pylist():
            url_of[row["key"]] = row["url"]
    filtered = work / params["filter"]["output"]
    dropped: dict[str, Counter] = {}
    kinds_total, kinds_dropped = Counter(noise.values()), Counter()
    clean_total = clean_dropped = 0
    for path in sorted((filtered / "rejects").glob("*.parquet")):
        for row in pq.read_table(path, columns=["key", "reason"]).to_pylist():
            kind = noise.get(url_of.get(row["key"]), "clean")
            dropped.setdefault(row["reason"], Counter())[kind] += 1
            kinds_dropped[kind] += 1
    for path in sorted((filtered / "kept").glob("*.parquet")):
        clean_total += sum(noise.get(url_of.get(key), "clean") == "clean"
                           for key in pq.read_table(path, columns=["key"]).column("key").to_pylist())
    clean_dropped = kinds_dropped.pop("clean", 0)
    clean_total += clean_dropped
    kept_urls = {url_of.get(key) for path in sorted((filtered / "kept").glob("*.parquet"))
                 for key in pq.read_table(path, columns=["key"]).column("key").to_pylist()}
    rules = {reason: {"dropped": sum(kinds.values()), "noise": sum(n for k, n in kinds.items() if k != "clean"),
                      "target": TARGETS.get(reason), "of_target": kinds.get(TARGETS.get(reason), 0),
                      "by_kind": dict(kinds)} for reason, kinds in sorted(dropped.items())}
    recall = {kind: {"rows": total, "dropped": kinds_dropped.get(kind, 0),
                     "by_its_rule": sum(rules[r]["by_kind"].get(kind, 0) for r in rules if TARGETS.get(r) == kind)}
              for kind, total in sorted(kinds_total.items())}
    return {"rules": rules, "recall": recall, "clean": {"rows": clean_total, "dropped": clean_dropped},
            "duplicate_pairs": duplicate_pairs(work, kept_urls), "clean_repeats": clean_repeats(work, kept_urls)}


def duplicate_pairs(work: Path, kept: set) -> dict:
    """A copy and its original are one image: the filter resolves the pair when it keeps at most one of them
    (which one depends on the order of the rows, so the row-wise table above cannot say)."""
    counts = Counter()
    for row in pq.read_table(work / "data/world/noise.parquet").to_pylist():
        if row["duplicate_of"] is not None:
            both = row["url"] in kept and row["duplicate_of"] in kept
            counts[f"{row['noise']} {'both kept' if both else 'resolved'}"] += 1
    return dict(sorted(counts.items()))


def clean_repeats(work: Path, kept: set) -> dict:
    """Clean rows whose scene (background, and each object's colour, shape, size and position) repeats an
    earlier training row's: semantic duplicates of the clean world itself, which SemDeDup is right to drop
    but noise.parquet does not list."""
    seen, repeats = set(), []
    for line in (work / "data/world/scenes/train.jsonl").read_text().splitlines():
        scene = json.loads(line)
        content = (scene["background"], tuple(sorted((o["colour"], o["shape"], o["size"], o["position"])
                                                     for o in scene["objects"])))
        if content in seen:
            repeats.append(scene["file_name"])
        seen.add(content)
    urls = {url for url in kept if url}
    prefix = next(iter(urls)).rsplit("/images/", 1)[0] if urls else ""
    dropped = sum(f"{prefix}/images/train/{name}" not in kept for name in repeats)
    return {"rows": len(repeats), "dropped": dropped}


def train_students(work: Path, params: dict, seeds: list[int], steps: int) -> dict:
    results = {}
    for seed in seeds:
        for variant, kept in (("filtered", params["filter"]["output"]), ("unfiltered", None)):
            name = f"{variant}-s{seed}"
            run = work / "runs" / name
            metrics = run / "evaluate.json"
            if not metrics.is_file():
                run.mkdir(parents=True, exist_ok=True)
                changed = json.loads(json.dumps(params))
                changed["distill"].update(kept=kept, seed=seed, max_steps=steps, output=f"runs/{name}/student",
                                          checkpoints=f"runs/{name}/checkpoints", plots=f"runs/{name}/curves")
                changed["evaluate"].update(student=f"runs/{name}/student", output=f"runs/{name}/eval",
                                           curves=f"runs/{name}/curves", seed=seed)
                # beside params.yaml: a params file's relative paths are relative to its folder
                (work / f"params-{name}.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
                vlkd(work, f"params-{name}.yaml", "distill", "--metrics", f"runs/{name}/distill.json")
                vlkd(work, f"params-{name}.yaml", "evaluate", "--metrics", f"runs/{name}/evaluate.json")
            results[name] = {"distill": json.loads((run / "distill.json").read_text()),
                             "scores": scores(json.loads(metrics.read_text()))}
    return results


def scores(metrics: dict) -> dict:
    out = {}
    for benchmark, mode in SCORES:
        result = metrics[benchmark]["modes"][mode] if mode else metrics[benchmark]
        value = "overall" if mode else "CIDEr"
        label = f"{benchmark} {mode}" if mode else f"{benchmark} CIDEr"
        out[label] = {"image": result[value], **{c: result["controls"][c][value] for c in CONTROLS
                                                   if c in result["controls"]}}
    return out


def interval(values: list[float]) -> str:
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    half = T95[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def print_rules(scored: dict) -> None:
    print("\n| rule | dropped | noise | of its kind | kind |\n|---|---:|---:|---:|---|")
    for reason, row in scored["rules"].items():
        print(f"| {reason} | {row['dropped']} | {row['noise']} | {row['of_target']} | {row['target']} |")
    print("\n| noise | rows | dropped (any rule) | by its rule |\n|---|---:|---:|---:|")
    for kind, row in scored["recall"].items():
        print(f"| {kind} | {row['rows']} | {row['dropped']} | {row['by_its_rule']} |")
    clean, repeats = scored["clean"], scored["clean_repeats"]
    print(f"| clean | {clean['rows']} | {clean['dropped']} | |")
    print(f"| clean, repeating an earlier scene | {repeats['rows']} | {repeats['dropped']} | |")
    print("\n" + ", ".join(f"{name}: {count}" for name, count in scored["duplicate_pairs"].items()))


def print_students(students: dict, seeds: list[int]) -> None:
    labels = list(next(iter(students.values()))["scores"])
    print("\n| score | condition | filtered | unfiltered | filtered - unfiltered (95% t-interval) |"
          "\n|---|---|---:|---:|---:|")
    for label in labels:
        for condition in ("image", *CONTROLS):
            pairs = [(students[f"filtered-s{s}"]["scores"][label].get(condition),
                      students[f"unfiltered-s{s}"]["scores"][label].get(condition)) for s in seeds]
            if any(a is None or b is None for a, b in pairs):
                continue
            filtered, unfiltered = [a for a, _ in pairs], [b for _, b in pairs]
            print(f"| {label} | {condition} | {spread(filtered)} | {spread(unfiltered)} | "
                  f"{interval([a - b for a, b in pairs])} |")


if __name__ == "__main__":
    main()
