"""The VLKD paper's recipe on the embedded world (the project's params.yaml, configs/embedded.yaml: TTDM + ITCL +
ICTI from the pooled image embedding), with variants and seeds, and where its score is lost on the ladder of
ceilings. The reproducible form of docs/experiments.md's "The paper's recipe as recorded".

    python benchmarks/paper_recipe.py --workdir /tmp/paper [--project .] [--seeds 0 1 2]
        [--only paper no-ttdm ...] [--variant NAME KEY=VALUE ...]... [--set KEY=VALUE ...]

Variants (VARIANTS below; `--variant` adds one, `--only` picks some, in its order; the first is the one the
others are compared with): paper (params.yaml as is), paper-free (the answer read from the free rewrite), one-token
(one prefix token and every weight at one rate: the code's defaults, the paper's recipe as first measured),
no-ttdm, no-itcl, no-icti (one objective's weight 0), aligned (distill.aligned_teacher: the ladder's rung of a
perfectly aligned teacher), plus-retention and plus-pseudoqa (one extension on), extended (every setting of
configs/embedded-extended.yaml: the four extensions).

Each variant and seed is a scratch project, `<workdir>/<variant>/seed<k>/`: `data/` links to the project's built
features, filtered rows, language model, teacher, world and evaluation cache (`dvc repro filter plm` builds them),
and its params.yaml is the project's with the variant's and `--set`'s values (`section.field=<YAML>`) and
`distill.seed=<k>`. In it the project's own `vlkd distill` and `vlkd evaluate` run (logs in `logs/`); a step
whose metrics file exists is not run again, so a killed run resumes.

Collects each evaluation's direct VQA with its controls, the ladder's rungs (the language model reading the
image's captions or its true description) and the share of the gap from the blank control to each rung the
student closes, prompt_kept, describe-mode VQA, the shifted world's VQA, CIDEr and the held-out text loss's change;
writes them to `<workdir>/results.json` and prints markdown tables: each score's mean ± sd over seeds per
variant, and each variant's paired difference from the first with a 95% t-interval.

One variant and seed on a quiet 2-core CPU: about a minute and a half of distillation (three with pseudo-QA) and
one of evaluation once the ladder's answers are cached.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from noisy_world import interval, spread  # benchmarks/, this script's folder, is on sys.path

PROJECT = Path(__file__).resolve().parents[1]
EXTENDED = "configs/embedded-extended.yaml"
LINKED = ("features", "filtered", "plm", "teacher", "world", "cache")  # data/ folders the runs read, never write
FREE = {"evaluate.decoding": "free"}
VARIANTS = {
    "paper": {},
    "paper-free": FREE,
    "one-token": {"distill.prefix_tokens": 1, "distill.language_model_lr": None},
    "no-ttdm": {"distill.ttdm_weight": 0},
    "no-itcl": {"distill.itcl_weight": 0},
    "no-icti": {"distill.icti_weight": 0},
    "aligned": {"distill.aligned_teacher": True},
    "plus-retention": {"distill.retention_weight": 1.0},
    "plus-pseudoqa": {"distill.reading_weight": 1.0},
    "extended": None,  # configs/embedded-extended.yaml's settings, read when the variant runs
}
SCRATCH = {"distill.init": None, "distill.checkpoints": "data/checkpoints/distill", "distill.plots": "metrics/distill",
           "evaluate.curves": "metrics/distill"}
CONTROLS = ("blank", "shuffled", "text_only", "prior")
RUNGS = ("captions", "description")
# (row label, path into a collected result); shares (0-1) are shown as percentages
ROWS = (("VQA direct", ("vqa", "direct")),
        *((f"VQA {c.replace('_', ' ')}", ("vqa", "controls", c)) for c in CONTROLS),
        *((f"ladder: {r}", ("vqa", "ladder", r)) for r in RUNGS),
        ("gap closed to captions %", ("vqa", "gap_closed", "captions")),
        ("prompt kept, image %", ("vqa", "prompt_kept", "image")),
        ("prompt kept, text only %", ("vqa", "prompt_kept", "text_only")),
        ("VQA describe", ("vqa", "describe")),
        ("shifted VQA direct", ("vqa-shifted", "direct")),
        ("shifted VQA blank", ("vqa-shifted", "controls", "blank")),
        ("shifted ladder: captions", ("vqa-shifted", "ladder", "captions")),
        ("CIDEr", ("captions", "CIDEr")),
        ("CIDEr blank", ("captions", "blank")),
        ("held-out loss change %", ("retention", "change_pct")),
        ("distill seconds", ("seconds", "distill")),
        ("evaluate seconds", ("seconds", "evaluate")))
PERCENT = {"gap_closed", "prompt_kept"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--project", type=Path, default=PROJECT, help="the project whose data/ and code run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="a variant of one's own: its name, then section.field=value overrides; repeatable")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these variants only, in this order")
    parser.add_argument("--set", nargs="*", default=[], help="section.field=value overrides (YAML) for every variant")
    args = parser.parse_args()
    project, work = args.project.resolve(), args.workdir.resolve()
    variants = {**VARIANTS, "extended": overlay_values(args.project.resolve() / EXTENDED),
                **{name: dict(map(assignment, rest)) for name, *rest in args.variant}}
    if args.only:
        unknown = [name for name in args.only if name not in variants]
        if unknown:
            sys.exit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(variants)}")
        variants = {name: variants[name] for name in args.only}
    missing = [name for name in LINKED if not (project / "data" / name).is_dir()]
    if missing:
        sys.exit(f"{project}/data lacks {', '.join(missing)}: run `dvc repro filter plm` there first")
    base = recipe(project, dict(map(assignment, args.set)))
    results = {"project": str(project), "set": args.set, "seeds": args.seeds, "variants": {}}
    for name, overrides in variants.items():
        results["variants"][name] = {"overrides": overrides, "seeds": {}}
        for seed in args.seeds:
            folder = work / name / f"seed{seed}"
            results["variants"][name]["seeds"][str(seed)] = run(project, folder, base, {**overrides, **SCRATCH,
                                                                                         "distill.seed": seed})
            work.joinpath("results.json").write_text(json.dumps(results, indent=1) + "\n")
    print_tables(results)


def assignment(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        sys.exit(f"{text!r} is not section.field=value")
    return key, yaml.safe_load(value)


def recipe(project: Path, overrides: dict) -> dict:
    """The project's params.yaml with `overrides`."""
    return with_values(yaml.safe_load((project / "params.yaml").read_text()), overrides)


def overlay_values(path: Path) -> dict:
    """An overlay's settings as {"section.field": value} (its `base` is the project's recipe)."""
    overlay = yaml.safe_load(path.read_text())
    return {f"{section}.{field}": value for section, values in overlay.items() if section != "base"
            for field, value in values.items()}


def with_values(params: dict, overrides: dict) -> dict:
    changed = json.loads(json.dumps(params))
    for key, value in overrides.items():
        section, field = key.split(".", 1)
        if section not in changed:
            sys.exit(f"{key}: params.yaml has no section {section!r}")
        changed[section][field] = value
    return changed


def run(project: Path, folder: Path, base: dict, overrides: dict) -> dict:
    """One variant and seed in its scratch project: distill, evaluate, and the scores collected."""
    params = yaml.safe_dump(with_values(base, overrides), sort_keys=False)
    metrics = folder / "metrics"
    if (folder / "params.yaml").is_file() and (folder / "params.yaml").read_text() != params and any(
            (metrics / f).is_file() for f in ("distill.json", "evaluate.json")):
        sys.exit(f"{folder} was run with other params: remove it, or use another --workdir")
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    for name in LINKED:
        link = folder / "data" / name
        if not link.is_symlink():
            link.symlink_to(project / "data" / name, target_is_directory=True)
    (folder / "params.yaml").write_text(params)
    seconds_file = folder / "seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    env = {**os.environ, "PATH": f"{project / '.venv/bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(project)}
    for step, extra in (("distill", ["--run-log", "metrics/distill-run.json"]), ("evaluate", [])):
        if (metrics / f"{step}.json").is_file():
            continue
        log = folder / "logs" / f"{step}.log"
        print(f"{folder}: vlkd {step} (log: {log})", flush=True)
        started = time.perf_counter()
        with log.open("w") as out:
            done = subprocess.run(["vlkd", step, "--metrics", f"metrics/{step}.json", *extra], cwd=folder, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
        if done.returncode:
            sys.exit(f"vlkd {step} failed in {folder} (exit {done.returncode}): see {log}")
        seconds[step] = round(time.perf_counter() - started, 1)
        seconds_file.write_text(json.dumps(seconds) + "\n")
    return {**collect(json.loads((metrics / "evaluate.json").read_text())), "seconds": seconds,
            "distill": json.loads((metrics / "distill.json").read_text())}


def collect(evaluation: dict) -> dict:
    out = {}
    for benchmark in ("vqa", "vqa-shifted"):
        scores = evaluation[benchmark]
        modes = scores.get("modes", {})
        direct = modes.get("direct", scores)
        controls = direct["controls"]
        out[benchmark] = {"direct": direct["overall"],
                          "controls": {c: controls[c]["overall"] for c in CONTROLS if c in controls},
                          "ladder": {r: v["overall"] for r, v in scores.get("ladder", {}).items()},
                          "gap_closed": {r: v["overall"] for r, v in direct.get("gap_closed", {}).items()},
                          "prompt_kept": direct.get("prompt_kept", {}),
                          "describe": modes.get("describe", {}).get("overall")}
    captions = evaluation["captions"]
    out["captions"] = {"CIDEr": captions["CIDEr"], "blank": captions["controls"]["blank"]["CIDEr"]}
    retention = evaluation.get("retention", {})
    if "student_loss" in retention:
        before, after = retention["language_model_loss"], retention["student_loss"]
        out["retention"] = {"language_model_loss": before, "student_loss": after,
                            "change_pct": round(100 * (after - before) / before, 2)}
    return out


def value(result: dict, path: tuple) -> float | None:
    for key in path:
        if not isinstance(result, dict) or result.get(key) is None:
            return None
        result = result[key]
    return 100 * result if PERCENT & set(path) else result


def print_tables(results: dict) -> None:
    seeds = [str(s) for s in results["seeds"]]
    variants = results["variants"]
    names = list(variants)
    per_seed = {name: [variants[name]["seeds"][s] for s in seeds] for name in names}
    print(f"\nmean ± sd over {len(seeds)} seed(s) ({', '.join(seeds)}); VQA: official accuracy %\n")
    print("| score | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for label, path in ROWS:
        cells = []
        for name in names:
            values = [value(r, path) for r in per_seed[name]]
            cells.append("–" if None in values else spread(values))
        print(f"| {label} | " + " | ".join(cells) + " |")
    if len(names) < 2:
        return
    first = names[0]
    print(f"\npaired difference from {first}, per seed: mean [95% t-interval]\n")
    print("| score | " + " | ".join(f"{name} − {first}" for name in names[1:]) + " |\n|---|"
          + "---:|" * (len(names) - 1))
    for label, path in ROWS:
        cells = []
        for name in names[1:]:
            pairs = [(value(a, path), value(b, path)) for a, b in zip(per_seed[name], per_seed[first], strict=True)]
            cells.append("–" if any(None in p for p in pairs) else interval([a - b for a, b in pairs]))
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
