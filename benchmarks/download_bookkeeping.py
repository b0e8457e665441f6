"""The download stage's own bookkeeping at N rows, the code before the record-batch rewrite against the code now.

    .venv/bin/python benchmarks/download_bookkeeping.py [--rows 10000 100000] [--repeats 2] [--json out.json]

The bookkeeping is everything `vlkd.corpus.download.download` does but the fetching: checking the URL list,
reading the shards' ledger, choosing the rows to fetch and the changed captions, writing the plan, and
accounting for every row (summary.json, failed.parquet). Its memory grew about 2.3 KB per row of the list
(docs/benchmarks.md, Scale). No network and no img2dataset: for each N a synthetic list shaped like the
world's (URL on 127.0.0.1, a caption and a list of 3 captions per row; 1% duplicates, 0.3% invalid rows) and
a shard folder as img2dataset leaves it (its parquet and stats files, shards of 1,000 rows, 3% failures)
are written once into a temporary folder, then two runs per code version:

    no-op rerun      the list of N rows against shards holding all of them: nothing to fetch
    refresh +5%      a list of 1.05 N rows (new rows spread through it) against the same shards; the
                     fetching is a stand-in that writes the plan's rows as successful shards (img2dataset's
                     reader loads the plan whole; so does the stand-in, inside the measured process)

Each run is a fresh process (peak RSS = its VmHWM) on its own copy of the shard folder. `old` is the
package as it was before vlkd/corpus/row_check.py was added (`git archive` of that commit's vlkd/ into a
temporary folder, first on PYTHONPATH); `new` is this checkout's. Peak RSS includes the imports (torch,
through webdataset, about 570 MB); `over imports` is the peak less the RSS right after importing. The load
average (1, 5, 15 min) is recorded before each run: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 1000
CC3M_ROWS = 3_300_000
WORDS = ("a", "an", "the", "red", "blue", "green", "large", "small", "circle", "square", "star", "diamond",
         "triangle", "on", "left", "right", "top", "bottom", "of", "in", "middle", "background", "with", "two",
         "three", "shapes", "light", "dark", "orange", "purple", "white", "black", "there", "is")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=2, help="runs per version, scenario and N (alternating)")
    parser.add_argument("--old-commit", default=None,
                        help="commit whose vlkd/ is `old` (default: the parent of the commit that added "
                             "vlkd/corpus/row_check.py)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--child", nargs=3, metavar=("LIST", "SHARDS", "SCENARIO"), help=argparse.SUPPRESS)
    return parser.parse_args()


def caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(6, 13)))


def write_world(folder: Path, rows: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """(the N-row list, the 1.05 N-row list, the shards holding the N-row list's usable rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    base = "http://127.0.0.1:18473/images/train/"

    def row(i: int) -> dict:
        main = caption(rng)
        return {"url": f"{base}{i:07d}.png", "caption": main, "captions": [main, caption(rng), caption(rng)]}

    listed = [row(i) for i in range(rows)]
    for i in rng.sample(range(rows), rows // 100):  # duplicates of an earlier row
        listed[i] = dict(listed[rng.randrange(i)]) if i else listed[i]
    for i in rng.sample(range(rows), rows * 3 // 1000):  # invalid: no caption, or not http
        listed[i] = {**listed[i], "caption": ""} if i % 2 else {**listed[i], "url": "ftp://host.test/x.png"}
    new = [row(rows + i) for i in range(rows // 20)]
    refreshed = list(listed)
    for offset, extra in enumerate(new):  # spread through the list, as a re-crawled list would have them
        refreshed.insert(rng.randrange(len(listed) + offset + 1), extra)
    first, second = folder / "list.parquet", folder / "list-refresh.parquet"
    pq.write_table(pa.Table.from_pylist(listed), first)
    pq.write_table(pa.Table.from_pylist(refreshed), second)

    seen, usable = set(), []
    for item in listed:
        if item["url"].startswith("http") and item["caption"] and item["url"] not in seen:
            seen.add(item["url"])
            usable.append(item)
    shards = folder / "shards"
    shards.mkdir()
    errors = ("HTTP Error 404: Not Found", "<urlopen error timed out>", "Image decoding error")
    for shard_id, start in enumerate(range(0, len(usable), SHARD_SIZE)):
        failed = {i: rng.choice(errors) for i in range(start, min(start + SHARD_SIZE, len(usable)))
                  if rng.random() < 0.03}
        write_shard(shards, shard_id, usable[start:start + SHARD_SIZE], failed, start)
    return first, second, shards


def write_shard(folder: Path, shard_id: int, rows: list[dict], failed: dict[int, str], start: int) -> None:
    """A shard's parquet and stats file as img2dataset's writer leaves them (an empty tar: nothing reads it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    status = ["failed_to_download" if start + i in failed else "success" for i in range(len(rows))]
    table = pa.table({
        "captions": [row["captions"] for row in rows], "caption": [row["caption"] for row in rows],
        "url": [row["url"] for row in rows], "key": [f"{shard_id:05d}{i:04d}" for i in range(len(rows))],
        "status": status, "error_message": [failed.get(start + i) for i in range(len(rows))],
        "width": pa.array([64] * len(rows), pa.int32()), "height": pa.array([64] * len(rows), pa.int32()),
        "sha256": [f"{start + i:064x}" for i in range(len(rows))],
    })
    pq.write_table(table, folder / f"{shard_id:05d}.parquet")
    (folder / f"{shard_id:05d}.tar").write_bytes(b"")
    successes = status.count("success")
    (folder / f"{shard_id:05d}_stats.json").write_text(json.dumps({
        "count": len(rows), "successes": successes, "failed_to_download": len(rows) - successes,
        "failed_to_resize": 0, "status_dict": {"success": successes}}))


def fake_img2dataset(input_file: Path, rows: int, staging: Path, start_shard_id: int, params, done) -> None:
    """Every planned row fetched: shards of the plan's rows, all successes (the stage's signature)."""
    import pyarrow.parquet as pq

    planned = pq.read_table(input_file).to_pylist()
    for offset, start in enumerate(range(0, len(planned), params.shard_size)):
        if start_shard_id + offset not in done:
            write_shard(staging, start_shard_id + offset, planned[start:start + params.shard_size], {}, 0)


def memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries it over fork and exec, so a
    child started by a parent holding a 1M-row world reports the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(url_list: Path, shards: Path, scenario: str) -> None:
    """One measured run, in this process: prints a JSON line."""
    started = time.perf_counter()
    import vlkd.corpus.download as stage
    from vlkd.config import DownloadParams

    import_seconds = time.perf_counter() - started
    after_imports = memory_mib("VmRSS")
    stage._run_img2dataset = fake_img2dataset
    params = DownloadParams(captions_col="captions", shard_size=SHARD_SIZE)
    started = time.perf_counter()
    summary = stage.download(url_list, shards, params)
    seconds = time.perf_counter() - started
    peak = memory_mib("VmHWM")
    expected = {"no-op": 0, "refresh": None}[scenario]
    assert expected is None or summary["this_run"]["fetched"] == expected, summary["this_run"]
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "after_imports_mib": after_imports,
                      "import_seconds": import_seconds, "fetched": summary["this_run"]["fetched"],
                      "url_list": summary["url_list"], "code": stage.__file__}))


def old_package(commit: str | None, folder: Path) -> tuple[Path, str]:
    """The vlkd package of `commit` (default: before the record-batch rewrite), exported into `folder`."""
    if commit is None:
        added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "vlkd/corpus/row_check.py"],
                               cwd=PROJECT, capture_output=True, text=True, check=True).stdout.split()
        commit = f"{added[-1]}~1"
    commit = subprocess.run(["git", "rev-parse", "--short", commit], cwd=PROJECT, capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "vlkd"], cwd=PROJECT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder, commit


def run(code: Path, url_list: Path, shards: Path, scenario: str, work: Path) -> dict:
    """A measured run on a copy of the shard folder, with `code` first on PYTHONPATH."""
    copy = work / "run-shards"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(shards, copy)
    environment = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{PROJECT}", "NO_ALBUMENTATIONS_UPDATE": "1"}
    load = os.getloadavg()
    done = subprocess.run([sys.executable, __file__, "--child", str(url_list), str(copy), scenario],
                          env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {scenario} run failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load": [round(x, 2) for x in load]}


def main() -> None:
    args = parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.child[2])
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="vlkd-bookkeeping-") as tmp:
        tmp = Path(tmp)
        (tmp / "old").mkdir()
        old, commit = old_package(args.old_commit, tmp / "old")
        versions = {"old": old, "new": PROJECT}
        for rows in args.rows:
            world = tmp / f"world-{rows}"
            world.mkdir()
            started = time.perf_counter()
            first, second, shards = write_world(world, rows)
            print(f"world of {rows} rows in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            for scenario, url_list in (("no-op", first), ("refresh", second)):
                for repeat in range(args.repeats):
                    for version in (("old", "new") if repeat % 2 == 0 else ("new", "old")):
                        result = run(versions[version], url_list, shards, scenario, tmp)
                        results.append({"rows": rows, "scenario": scenario, "version": version, "repeat": repeat,
                                        **result})
                        print(f"{rows} {scenario} {version}: {result['seconds']:.2f} s, "
                              f"{result['peak_mib']:.0f} MiB, load {result['load']}", file=sys.stderr)
                by_version = {r["version"]: r["url_list"] for r in results if r["rows"] == rows
                              and r["scenario"] == scenario}
                assert by_version["old"] == by_version["new"], f"the summaries differ: {by_version}"
    report(results, commit, args)
    if args.json:
        args.json.write_text(json.dumps({"old_commit": commit, "results": results}, indent=1) + "\n")


def report(results: list[dict], commit: str, args: argparse.Namespace) -> None:
    """The runs (best seconds and highest peak of the repeats), then bytes per row and CC3M extrapolated."""
    print(f"{os.cpu_count()} CPU(s); old = vlkd/ at {commit}, new = this checkout; {args.repeats} run(s) each, "
          "alternating; seconds: the fastest, peak: the highest")
    print()
    print("| rows (list) | run | code | seconds | peak RSS MiB | over imports MiB | load avg (1, 5, 15 min) |")
    print("|---:|---|---|---:|---:|---:|---|")
    table = {}
    for rows in args.rows:
        for scenario in ("no-op", "refresh"):
            for version in ("old", "new"):
                runs = [r for r in results if (r["rows"], r["scenario"], r["version"]) == (rows, scenario, version)]
                best = {"seconds": min(r["seconds"] for r in runs), "peak": max(r["peak_mib"] for r in runs),
                        "over": max(r["peak_mib"] - r["after_imports_mib"] for r in runs)}
                table[rows, scenario, version] = best
                loads = "; ".join(" ".join(f"{x:.1f}" for x in r["load"]) for r in runs)
                listed = rows if scenario == "no-op" else rows + rows // 20
                print(f"| {listed:,} | {scenario} | {version} | {best['seconds']:.2f} | {best['peak']:.0f} | "
                      f"{best['over']:.0f} | {loads} |")
    if len(args.rows) < 2:
        return
    low, high = min(args.rows), max(args.rows)
    print()
    print(f"| run | code | peak bytes per list row ({low:,} -> {high:,}) | peak growth | CC3M ({CC3M_ROWS:,} "
          "rows) peak, extrapolated |")
    print("|---|---|---:|---:|---:|")
    for scenario in ("no-op", "refresh"):
        for version in ("old", "new"):
            small, large = table[low, scenario, version]["peak"], table[high, scenario, version]["peak"]
            per_row = (large - small) * 2**20 / (high - low)
            cc3m = small + per_row * (CC3M_ROWS - low) / 2**20
            print(f"| {scenario} | {version} | {per_row:,.0f} | {(large / small - 1):+.0%} | {cc3m / 1024:.1f} GiB |")


if __name__ == "__main__":
    main()
