"""A scale rehearsal: the pipeline at N rows on loopback, each stage's cost per row, DVC's own overhead, and
a +5% refresh, through the Prefect refresh flow and DVC as a scheduled run goes.

    .venv/bin/python benchmarks/scale.py --rows 10000 30000 100000 [--new-share 0.05] [--results scale.json]
    .venv/bin/python benchmarks/scale.py --report scale.json [--plot docs/scale.svg]

In one copy of the project (its committed files, a git repo of its own), the fixed-cost stages first:
`dvc repro teacher plm` builds the project's small world, the world's teacher (as recorded) and a tiny
language model, once. Then for each N:
1. The corpus: the synthetic world generated with N training images *outside* the project, as a user's URL
   list is one file from elsewhere, and served on 127.0.0.1 by a process of its own (the web's side of a
   download is not the download's cost). Its 1.05 N version, whose first N rows are the same, is generated
   too. World generation is timed, but it is not a pipeline stage: a real corpus has none.
2. The corpus stages' outputs, the promoted tags and the DVC remote are reset, as on a new project with a
   pretrained teacher. The full run: the refresh flow with `download.url_list` pointed at the N-row list, up
   to `distill`: download, features, filter, and one epoch of distillation of a tiny student with the
   paper's recipe (the fixed-cost stages are up to date). No gate (no evaluation runs), so the flow promotes
   the student as v1.
3. DVC's own seconds: `dvc status` with nothing changed (the best of 3), `dvc push` to an empty local remote,
   and for each stage the seconds `dvc repro` took beyond the stage command's own (start, hashing, lock).
4. The refresh: the flow again on the 1.05 N list. It fetches, embeds and filters the new rows only and
   continues distillation from v1 on the new rows plus as many replayed ones. Then `dvc status` and an
   incremental `dvc push`.

For each stage and N: seconds (DVC's and the command's), rows, seconds per 1,000 rows, peak RSS (the
command's run log), and the bytes its outputs hold. Results are appended to `--results` (JSON) after each
N, so a long run keeps what it measured; `--report` prints the markdown tables and the goals' checks from
that file and writes a log-log plot of seconds against rows per stage. docs/benchmarks.md keeps the
measured tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))  # flows/ is a folder of the project, not an installed package

from pipeline import copy_project, free_port  # noqa: E402 (benchmarks/pipeline.py, beside this file)

# The stages whose work grows with the corpus, and what each run log calls the rows it handled.
CORPUS_STAGES = ("download", "features", "filter", "distill")
# Fixed-cost stages: they do not read the corpus (the world's teacher pretrains on its own pairs, the language
# model on its own text), so their size says nothing about scaling. The teacher is the recorded world's (the
# filter's CLIP-score rule and SemDeDup need its embedding space; a weaker one packs every image together);
# it trains once per invocation, before the first N. The language model and the student are tiny; the
# student trains one epoch with the paper's recipe (no reading, no retention).
FIXED = {
    "synth.images": 200, "synth.eval_images": 8, "synth.shifted_images": 4, "synth.task_images": 8,
    "synth.text_scenes": 300,
    "plm.vocab_size": 300, "plm.d_model": 32, "plm.layers": 1, "plm.heads": 2, "plm.ffn_dim": 64,
    "plm.max_length": 32, "plm.epochs": 1, "plm.warmup_steps": 1, "plm.qa_questions": 10,
    "distill.epochs": 1, "distill.max_length": 32, "distill.reading_weight": 0.0, "distill.retention_weight": 0.0,
    "pipeline.push": False, "pipeline.gate": [],
}
GOAL_PER_ROW = 0.20     # seconds per row and peak RSS at the largest N within 20% of the smallest N's
GOAL_STATUS_SECONDS = 5.0
GOAL_REFRESH_SHARE = 0.10


def run(command: list[str], cwd: Path) -> float:
    """Run a command to completion (its output kept for an error); returns its seconds."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.is_dir() else 0


def make_world(project: Path, folder: Path, images: int) -> float:
    """`vlkd synth` of an N-image world into `folder` (outside the project, served on the port params.yaml
    names); returns its seconds."""
    return run([str(Path(sys.executable).parent / "vlkd"), "synth", "--output", str(folder),
                "--images", str(images)], cwd=project)


class WorldServer:
    """The world folder served on 127.0.0.1:port by a process of its own, as the web is to a download."""

    def __init__(self, folder: Path, port: int) -> None:
        code = ("import sys, time; from pathlib import Path; from vlkd.world.server import serve_folder\n"
                "with serve_folder(Path(sys.argv[1]), int(sys.argv[2])):\n    time.sleep(1e9)\n")
        self.process = subprocess.Popen([sys.executable, "-c", code, str(folder), str(port)], cwd=PROJECT)
        url = f"http://127.0.0.1:{port}/world.json"
        for _ in range(200):
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    response.read()  # read to the end: a probe that hangs up leaves the server a broken pipe
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the world server on port {port} did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def stage_records(project: Path, result: dict) -> dict[str, dict]:
    """stage -> status, DVC's seconds, the command's seconds, rows, peak MiB, output bytes."""
    from vlkd.orchestrate import stages as dvc

    outs = {stage.name: [out.path for out in stage.outs if out.cached] for stage in dvc.list_stages(project)}
    records = {}
    for item in result["stages"]:
        name, ran = item["stage"], item["status"] == "ran"
        log_file = project / "metrics" / "runs" / f"{name}.json"
        log = json.loads(log_file.read_text()) if ran and log_file.is_file() else {}
        records[name] = {
            "status": item["status"],
            "seconds": item["seconds"],
            "command_seconds": log.get("seconds"),
            "rows": rows_handled(project, name, log) if ran else 0,
            "peak_mib": max(log.get("peak_rss_mib", 0), log.get("peak_rss_children_mib", 0)) or None,
            "bytes": sum(folder_bytes(project / path) for path in outs.get(name, [])),
        }
    return records


def rows_handled(project: Path, stage: str, log: dict) -> int | None:
    if stage == "download":
        return log.get("fetched")
    if stage == "features":
        return log.get("images_encoded")
    if stage == "filter":
        return log.get("rows_filtered")
    if stage == "distill":  # {"all": n} for a fresh student, {"new": n, "replayed": m} for a continuation
        return sum(json.loads((project / "metrics" / "distill.json").read_text())["trained_rows"].values())
    return None


def dvc_seconds(project: Path, *args: str) -> float:
    return run([str(Path(sys.executable).parent / "dvc"), *args], cwd=project)


def prepare(workdir: Path) -> tuple[Path, int, float]:
    """One copy of the project for every N, its fixed-cost stages built once (`dvc repro teacher plm`: the
    project's small world, the teacher, the language model); returns (project, port, seconds)."""
    from vlkd.orchestrate.params import apply_overrides

    project = copy_project(workdir / "project")
    port = free_port()  # the worlds' URLs name it; one per invocation, as a corpus's host is one
    apply_overrides(project, {**FIXED, "synth.port": port})
    return project, port, dvc_seconds(project, "repro", "teacher", "plm")


def reset_corpus(project: Path, remote: Path) -> None:
    """Back to no corpus and no promoted model, the fixed-cost stages kept: the next full run starts from
    nothing, as on a new project with a pretrained teacher, and pushes to an empty remote of its own."""
    from vlkd.config import load_params
    from vlkd.orchestrate import stages as dvc
    from vlkd.orchestrate.promote import clear_folder

    tags = subprocess.run(["git", "tag", "--list", "promoted/*"], cwd=project, check=True, capture_output=True,
                          text=True).stdout.split()
    for tag in tags:
        run(["git", "tag", "--delete", tag], cwd=project)
    for stage in dvc.list_stages(project):
        if stage.name in CORPUS_STAGES:
            for out in stage.outs:
                target = project / out.path
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    clear_folder(Path(load_params(project / "params.yaml").distill.init))
    dvc_seconds(project, "remote", "add", "--local", "--default", "--force", "scale", str(remote))


def measure(project: Path, port: int, rows: int, new_share: float, workdir: Path) -> dict:
    """The full run and the refresh at `rows` rows; see the module's docstring."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.refresh import refresh

    base = workdir / f"n{rows}"
    grown = round(rows * (1 + new_share))
    worlds = {count: base / f"world-{count}" for count in (rows, grown)}
    world_seconds = {count: make_world(project, folder, count) for count, folder in worlds.items()}
    reset_corpus(project, base / "remote")

    record: dict = {"rows": rows, "grown": grown, "world_seconds": world_seconds}
    with prefect_test_harness():
        for run_name, count in (("full", rows), ("refresh", grown)):
            server = WorldServer(worlds[count], port)
            try:
                started = time.perf_counter()
                result = refresh(url_list=str(worlds[count] / "urls.parquet"),
                                 params_file=str(project / "params.yaml"), until="distill")
                wall = time.perf_counter() - started
            finally:
                server.stop()
            record[run_name] = {
                "wall": wall, "promoted": result.get("promoted"), "stages": stage_records(project, result),
                "dvc_status": min(dvc_seconds(project, "status") for _ in range(3)),
                "dvc_push": dvc_seconds(project, "push"),
            }
    return record


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------
def per_k(seconds: float | None, rows: int | None) -> str:
    return f"{1000 * seconds / rows:.2f}" if seconds and rows else "-"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def corpus_seconds(run_record: dict) -> float:
    """Seconds of the stages that grow with the corpus, as DVC ran them."""
    return sum(run_record["stages"][name]["seconds"] for name in CORPUS_STAGES)


def stage_table(records: list[dict]) -> str:
    lines = ["| N | stage | rows | s (dvc repro) | s (command) | dvc's own s | s / 1k rows | peak MiB | output MiB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for record in records:
        for name, stage in record["full"]["stages"].items():
            own = stage["seconds"] - stage["command_seconds"] if stage["command_seconds"] else None
            lines.append(
                f"| {record['rows']:,} | {name} | {stage['rows'] or '-'} | {stage['seconds']:.1f} | "
                f"{_seconds(stage['command_seconds'])} | {_seconds(own)} | "
                f"{per_k(stage['command_seconds'], stage['rows']) if name in CORPUS_STAGES else '-'} | "
                f"{stage['peak_mib'] or '-'} | {stage['bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def refresh_table(records: list[dict]) -> str:
    lines = ["| N | world s (N, 1.05 N) | full: flow s | refresh: flow s | refresh / full (flow) | corpus stages: "
             "full s, refresh s, share | download: refresh / full | dvc status s (full, refresh) | "
             "dvc push s (full, refresh) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for record in records:
        full, again = record["full"], record["refresh"]
        download = again["stages"]["download"]["seconds"] / full["stages"]["download"]["seconds"]
        worlds = ", ".join(f"{seconds:.0f}" for seconds in record["world_seconds"].values())
        corpus_full, corpus_again = corpus_seconds(full), corpus_seconds(again)
        lines.append(f"| {record['rows']:,} | {worlds} | {full['wall']:.1f} | {again['wall']:.1f} | "
                     f"{again['wall'] / full['wall']:.3f} | {corpus_full:.1f}, {corpus_again:.1f}, "
                     f"{corpus_again / corpus_full:.3f} | {download:.3f} | "
                     f"{full['dvc_status']:.2f}, {again['dvc_status']:.2f} | {full['dvc_push']:.1f}, "
                     f"{again['dvc_push']:.1f} |")
    lines.append("")
    lines.append("| N | stage | refresh: status | refresh: s | refresh rows | refresh / full |")
    lines.append("|---:|---|---|---:|---:|---:|")
    for record in records:
        for name, stage in record["refresh"]["stages"].items():
            first = record["full"]["stages"][name]
            share = "-" if first["status"] != "ran" else f"{stage['seconds'] / first['seconds']:.3f}"
            lines.append(f"| {record['rows']:,} | {name} | {stage['status']} | {stage['seconds']:.1f} | "
                         f"{stage['rows'] or '-'} | {share} |")
    return "\n".join(lines)


def goals(records: list[dict]) -> list[str]:
    """Each goal of the rehearsal, met or missed, with its numbers."""
    small, large = min(records, key=lambda r: r["rows"]), max(records, key=lambda r: r["rows"])
    lines = []
    for name in CORPUS_STAGES:
        a, b = small["full"]["stages"][name], large["full"]["stages"][name]
        rate_a, rate_b = a["command_seconds"] / a["rows"], b["command_seconds"] / b["rows"]
        change = rate_b / rate_a - 1
        lines.append(f"{name}: s/row {1000 * rate_a:.2f} -> {1000 * rate_b:.2f} ms ({change:+.0%}) "
                     f"{'met' if change <= GOAL_PER_ROW else 'MISSED'}; peak {a['peak_mib']} -> {b['peak_mib']} MiB "
                     f"({b['peak_mib'] / a['peak_mib'] - 1:+.0%}) "
                     f"{'met' if b['peak_mib'] <= (1 + GOAL_PER_ROW) * a['peak_mib'] else 'MISSED'}")
    status = max(large["full"]["dvc_status"], large["refresh"]["dvc_status"])
    lines.append(f"dvc status at {large['rows']:,} rows: {status:.2f} s "
                 f"{'met' if status < GOAL_STATUS_SECONDS else 'MISSED'}")
    share = large["refresh"]["wall"] / large["full"]["wall"]
    lines.append(f"refresh / full, end to end, at {large['rows']:,}: {share:.3f} "
                 f"{'met' if share <= GOAL_REFRESH_SHARE else 'MISSED'}")
    download = large["refresh"]["stages"]["download"]["seconds"] / large["full"]["stages"]["download"]["seconds"]
    lines.append(f"download refresh / full at {large['rows']:,}: {download:.3f} "
                 f"{'met' if download <= GOAL_REFRESH_SHARE else 'MISSED'}")
    return lines


CORPORA = {"CC3M": 3_318_333, "LAION-400M": 400_000_000}


def linear_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares seconds = fixed + per_row * rows; (fixed, per_row)."""
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    per_row = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return mean_y - per_row * mean_x, per_row


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


def _size(count: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f} B"


def extrapolation_table(records: list[dict], workers: int = 16) -> str:
    """From the measured slopes: each corpus stage's time and disk for CC3M and LAION-400M on this machine,
    and on `workers` workers if the stage's work splits evenly (img2dataset's processes or Spark/Ray workers
    for the download; torchrun ranks for features and distillation). Extrapolated, not measured."""
    names = list(CORPORA)
    lines = [f"| stage | fixed s | ms per row | {' | '.join(f'{n}: this machine' for n in names)} | "
             f"{' | '.join(f'{n}: {workers} workers' for n in names)} | bytes per row | "
             f"{' | '.join(f'{n}: disk' for n in names)} |",
             "|---|---:|---:|" + "---:|" * (3 * len(names) + 1)]
    largest = max(records, key=lambda r: r["rows"])
    for name in CORPUS_STAGES:
        points = [(r["full"]["stages"][name]["rows"], r["full"]["stages"][name]["command_seconds"]) for r in records]
        fixed, per_row = linear_fit(points)
        stage = largest["full"]["stages"][name]
        here = [fixed + per_row * rows for rows in CORPORA.values()]
        spread = [fixed + per_row * rows / workers for rows in CORPORA.values()]
        if name == "distill":  # its output is the student, whatever the rows
            disk = ["-", *("-" for _ in CORPORA)]
        else:
            per_row_bytes = stage["bytes"] / stage["rows"]
            disk = [f"{per_row_bytes:,.0f}", *(_size(per_row_bytes * rows) for rows in CORPORA.values())]
        lines.append(f"| {name} | {fixed:.1f} | {1000 * per_row:.2f} | "
                     f"{' | '.join(_duration(t) for t in here)} | {' | '.join(_duration(t) for t in spread)} | "
                     f"{' | '.join(disk)} |")
    return "\n".join(lines)


def loglog_svg(records: list[dict], width: int = 520, height: int = 340) -> str:
    """Seconds (the command's) against rows, one line per corpus stage, both axes logarithmic. Hand-written
    SVG: one plot does not justify a plotting library in the project's environment."""
    colours = {"download": "#1f77b4", "features": "#ff7f0e", "filter": "#2ca02c", "distill": "#d62728"}
    points = {name: [(r["full"]["stages"][name]["rows"], r["full"]["stages"][name]["command_seconds"])
                     for r in sorted(records, key=lambda r: r["rows"])] for name in CORPUS_STAGES}
    xs = [x for line in points.values() for x, _ in line]
    ys = [y for line in points.values() for _, y in line]
    x_lo, x_hi = math.floor(math.log10(min(xs))), math.ceil(math.log10(max(xs)))
    y_lo, y_hi = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    left, right, top, bottom = 60, 120, 20, 40

    def at(x: float, y: float) -> tuple[float, float]:
        px = left + (math.log10(x) - x_lo) / (x_hi - x_lo) * (width - left - right)
        py = height - bottom - (math.log10(y) - y_lo) / (y_hi - y_lo) * (height - top - bottom)
        return px, py

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for power in range(x_lo, x_hi + 1):
        px, _ = at(10 ** power, 10 ** y_lo)
        parts.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{height - bottom}" stroke="#ddd"/>'
                     f'<text x="{px:.1f}" y="{height - bottom + 14}" text-anchor="middle">{10 ** power:,}</text>')
    for power in range(y_lo, y_hi + 1):
        _, py = at(10 ** x_lo, 10 ** power)
        parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{width - right}" y2="{py:.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">{10 ** power:g} s</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">rows</text>')
    for index, (name, line) in enumerate(points.items()):
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in (at(x, y) for x, y in line))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colours[name]}" stroke-width="2"/>')
        parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colours[name]}"/>'
                  for px, py in (at(x, y) for x, y in line)]
        parts.append(f'<text x="{width - right + 10}" y="{top + 16 * index + 10}" fill="{colours[name]}">{name}</text>')
    # a slope-1 guide: where a stage whose cost is linear in the rows would lie
    (x0, y0), (x1, _) = points["features"][0], points["features"][-1]
    (ax, ay), (bx, by) = at(x0, y0 * 2), at(x1, y0 * 2 * x1 / x0)
    parts.append(f'<line x1="{ax:.1f}" y1="{ay:.1f}" x2="{bx:.1f}" y2="{by:.1f}" stroke="#999" '
                 'stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{width - right + 10}" y="{top + 16 * len(points) + 10}" fill="#999">linear</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def report(results: Path, plot: Path | None) -> None:
    records = sorted(json.loads(results.read_text())["records"], key=lambda r: r["rows"])
    print(stage_table(records), end="\n\n")
    print(refresh_table(records), end="\n\n")
    if len(records) > 1:
        print("\n".join(f"- {line}" for line in goals(records)), end="\n\n")
        print(extrapolation_table(records))
        if plot is not None:
            plot.write_text(loglog_svg(records))
            print(f"\nplot: {plot}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[10000, 30000, 100000])
    parser.add_argument("--new-share", type=float, default=0.05)
    parser.add_argument("--results", type=Path, default=Path("scale.json"), help="appended after each N")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the copies here (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep each N's copy and worlds (default: deleted)")
    parser.add_argument("--report", type=Path, default=None, help="print the tables of a results file and stop")
    parser.add_argument("--plot", type=Path, default=None, help="with --report: write the log-log plot here")
    args = parser.parse_args()
    if args.report:
        report(args.report, args.plot)
        return 0

    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vlkd-bench-scale-"))
    stored = json.loads(args.results.read_text()) if args.results.is_file() else {"records": []}
    project, port, setup_seconds = prepare(workdir)
    print(f"fixed-cost stages (synth of the project's world, teacher, plm): {setup_seconds:.1f} s", flush=True)
    for rows in args.rows:
        record = measure(project, port, rows, args.new_share, workdir)
        record["machine"] = f"{platform.node()}: {os.cpu_count()} cores"
        record["fixed_stages_seconds"] = setup_seconds
        stored["records"] = [r for r in stored["records"] if r["rows"] != rows] + [record]
        args.results.write_text(json.dumps(stored, indent=2))
        print(f"{rows:,} rows: full {record['full']['wall']:.1f} s, refresh {record['refresh']['wall']:.1f} s",
              flush=True)
        if not args.keep:
            shutil.rmtree(workdir / f"n{rows}", ignore_errors=True)
    report(args.results, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
