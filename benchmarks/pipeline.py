"""What a corpus refresh costs against a full run, stage by stage, through the Prefect flows.

    .venv/bin/python benchmarks/pipeline.py [--size embedded|tiny] [--new-share 0.05] [--concurrent-stages 1]
                                            [--until evaluate|all]

In one invocation, on a fresh copy of the project (its committed files only, a git repo of its own, the
DVC remote beside it): the refresh flow from nothing (the full run, the baseline: with nothing promoted
yet it runs every stage up to `--until` and promotes the model as v1), then the refresh flow again with `synth.images`
grown by `--new-share` (the world's first images stay as they were, so the list gains that share of new
rows): it downloads and embeds the new rows only and continues distillation from v1 on them plus a
replayed sample. For each stage: the seconds DVC took (run, or skipped when up to date) and the stage
command's peak resident memory (from its run log, `metrics/runs/<stage>.json`), and the refresh's seconds
as a share of the full run's. `--size embedded` is params.yaml as it is (the recorded run); `--size tiny`
shrinks every stage to seconds (a check of the script, not a measurement). Prints a markdown table;
docs/benchmarks.md keeps the measured ones. `--until evaluate` (the default) stops where the gate's metrics
are written: the fine-tuning stages (vlm, finetune) train on the tasks' fixed data whatever the corpus
gained, a cost per promoted model rather than per new row; `--until all` includes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))  # flows/ is a folder of the project, not an installed package

TINY = {
    "synth.images": 200, "synth.eval_images": 8, "synth.shifted_images": 4, "synth.text_scenes": 200,
    "synth.pretrain_images": 200,
    "synth.image_size": 48, "download.shard_size": 20, "download.processes": 1, "teacher.epochs": 1,
    "teacher.batch_size": 16, "teacher.warmup_steps": 1, "features.batch_size": 32, "features.num_workers": 0,
    "plm.vocab_size": 300, "plm.d_model": 32, "plm.layers": 1, "plm.heads": 2, "plm.ffn_dim": 64,
    "plm.max_length": 32, "plm.epochs": 1, "plm.batch_size": 16, "plm.warmup_steps": 1, "plm.qa_questions": 10,
    "distill.epochs": 1, "distill.batch_size": 8, "distill.warmup_steps": 1, "evaluate.batch_size": 8,
    "vlm.hidden": 32, "vlm.layers": 1, "vlm.heads": 2, "vlm.ffn_dim": 64, "vlm.epochs": 1,
    "finetune.fractions": [1.0], "finetune.seeds": [0], "finetune.ablations": [], "finetune.epochs": 1,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copy_project(target: Path) -> Path:
    """The project's committed files (no data, no lock, no metrics) as a git repo of its own."""
    files = subprocess.run(["git", "ls-files"], cwd=PROJECT, check=True, capture_output=True,
                           text=True).stdout.splitlines()
    for name in files:
        if name.startswith("metrics/") or name == "dvc.lock" or not (PROJECT / name).is_file():
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / name, target / name)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run([*git, "init", "--quiet"], cwd=target, check=True)
    subprocess.run([*git, "add", "-A"], cwd=target, check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "benchmark copy"], cwd=target, check=True)
    return target


def stage_rows(project: Path, result: dict) -> dict[str, dict]:
    """stage -> {status, seconds, peak MiB}; peak memory only for stages that ran (a skipped stage's run log
    is the last run's)."""
    rows = {}
    for item in result["stages"]:
        log = project / "metrics" / "runs" / f"{item['stage']}.json"
        peak = None
        if item["status"] == "ran" and log.is_file():
            record = json.loads(log.read_text())
            peak = max(record.get("peak_rss_mib", 0), record.get("peak_rss_children_mib", 0)) or None
        rows[item["stage"]] = {"status": item["status"], "seconds": item["seconds"], "peak": peak}
    return rows


def table(full: dict[str, dict], refresh: dict[str, dict], walls: tuple[float, float]) -> str:
    lines = ["| stage | full: s | full: peak MiB | refresh: status | refresh: s | refresh: peak MiB | refresh / full |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for stage, first in full.items():
        again = refresh.get(stage, {"status": "-", "seconds": 0.0, "peak": None})
        lines.append(f"| {stage} | {first['seconds']:.1f} | {first['peak'] or '-'} | {again['status']} | "
                     f"{again['seconds']:.1f} | {again['peak'] or '-'} | {again['seconds'] / first['seconds']:.2f} |")
    total_full = sum(row["seconds"] for row in full.values())
    total_refresh = sum(row["seconds"] for row in refresh.values())
    lines.append(f"| all stages, summed | {total_full:.1f} | | | {total_refresh:.1f} | | "
                 f"{total_refresh / total_full:.2f} |")
    full_wall, refresh_wall = walls
    lines.append(f"| **the flow, wall clock** | {full_wall:.1f} | | | {refresh_wall:.1f} | | "
                 f"**{refresh_wall / full_wall:.2f}** |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["embedded", "tiny"], default="embedded")
    parser.add_argument("--new-share", type=float, default=0.05, help="new rows of the refresh, as a share")
    parser.add_argument("--concurrent-stages", type=int, default=None, help="pipeline.concurrent_stages")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the copy here (default: a temp folder)")
    parser.add_argument("--until", default="evaluate",
                        help="the last stage of both runs (default evaluate: the gate's metrics; 'all': every stage)")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from flows.refresh import refresh
    from vlkd.config import load_params
    from vlkd.orchestrate.params import apply_overrides

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vlkd-bench-pipeline-"))
    project = copy_project(workdir / "project")
    overrides = {**(TINY if args.size == "tiny" else {}), "synth.port": free_port(), "pipeline.push": False}
    if args.concurrent_stages is not None:
        overrides["pipeline.concurrent_stages"] = args.concurrent_stages
    apply_overrides(project, overrides)
    images = load_params(project / "params.yaml").synth.images
    grown = round(images * (1 + args.new_share))
    until = None if args.until == "all" else args.until
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

    with prefect_test_harness():
        started = time.perf_counter()
        full = refresh(params_file=str(project / "params.yaml"), until=until)
        full_wall = time.perf_counter() - started
        full_rows = stage_rows(project, full)
        started = time.perf_counter()
        again = refresh(params_file=str(project / "params.yaml"), overrides={"synth.images": grown},
                        until=until)
        refresh_wall = time.perf_counter() - started
        refresh_rows = stage_rows(project, again)

    settings = load_params(project / "params.yaml").pipeline
    print(f"\n{platform.node()}: {os.cpu_count()} cores, torch threads as the stages set them; size {args.size}, "
          f"{images} -> {grown} images (+{args.new_share:.0%}), until {args.until}, "
          f"concurrent_stages {settings.concurrent_stages}; "
          f"full run promoted: {full.get('promoted')}; refresh promoted: {again.get('promoted')} "
          f"({again.get('gate_summary')})\n")
    print(table(full_rows, refresh_rows, (full_wall, refresh_wall)))
    print(f"\nproject copy: {project}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
