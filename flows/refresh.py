"""Refresh: a new version of the URL list through the pipeline, promoted only if it is no worse.

    lock the workspace -> point download.url_list at the new list (and any other overrides) -> the
    pipeline (download fetches only URLs no shard holds; features computes only new shards) -> compare
    the gated metrics (pipeline.gate) with those of the last promoted model, read from its git tag ->
    compare the whole run with it (every metric, the answers that changed, the curves: reports/refresh/
    comparison.html and .json, vlkd/orchestrate/compare.py) -> promote: commit dvc.lock, params.yaml,
    dvc.yaml and the metric files, tag promoted/vN -> an artifact with the before/after tables, promoted or not

A rejected model stays in the workspace for inspection; the promoted one is one command away (the
flow logs it and returns it as `restore`):
`git checkout promoted/vN -- dvc.lock params.yaml metrics/... && dvc checkout --force <stages>`.

    python -m flows.refresh [--url-list new.parquet] [--set synth.images=2200 ...] [--params params.yaml]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.pipeline import _owner, arguments, print_result, run_pipeline
from vlkd.config import PARAMS_FILE, load_params
from vlkd.errors import VlkdError
from vlkd.orchestrate import stages as dvc
from vlkd.orchestrate.compare import compare_with_promoted
from vlkd.orchestrate.comparison_report import answer_counts, markdown_summary, write_comparison
from vlkd.orchestrate.gate import GateReport, compare, relative_name
from vlkd.orchestrate.lock import WorkspaceLock
from vlkd.orchestrate.metrics import read_metrics, text_table
from vlkd.orchestrate.params import find_project, parse_assignments, preview
from vlkd.orchestrate.promote import (
    clear_folder,
    dirty_tracked,
    last_promoted,
    locked_outputs,
    metrics_at,
    place_output_at,
    promote,
    recorded_param,
    require_repo,
    restore_command_at,
)

GATE_ARTIFACT = "vlkd-gate"
GATE_COLUMNS = ["metric", "promoted", "new", "change", "allowed worsening", "verdict"]
# A view of two recorded runs, rewritten by every refresh: not a DVC output, ignored by git.
COMPARISON_FOLDER = "reports/refresh"


def url_list_override(root: Path, url_list: str) -> str:
    """The value for download.url_list: relative to the project when the list is inside it."""
    path = Path(url_list).expanduser()
    path = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if not path.is_file():
        raise VlkdError(f"URL list {path} does not exist; pass the new version of the list as url_list")
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def record_paths(root: Path, stages: list[dvc.Stage]) -> list[str]:
    """What a promotion commits: the pipeline, its lock, the params, every output git holds (metric and
    plot files DVC does not cache) and the .gitignore files DVC keeps for its outputs."""
    paths = {"dvc.yaml", "dvc.lock", PARAMS_FILE}
    for stage in stages:
        for out in stage.outs:
            if not out.cached:
                paths.add(out.path)
            else:
                ignore = Path(out.path).parent / ".gitignore"
                if (root / ignore).is_file():
                    paths.add(ignore.as_posix())
    return sorted(paths)


@flow(name="vlkd-refresh")
def refresh(url_list: str | None = None, params_file: str = PARAMS_FILE, overrides: dict[str, Any] | None = None,
            until: str | None = None) -> dict[str, Any]:
    """Run the pipeline on a new version of the URL list and promote the model if the gate passes.

    Args:
        url_list: the new list (parquet, csv or tsv); None: the list params.yaml names (e.g. after
            `synth.images` grew, or the file was replaced).
        params_file: the project's params.yaml, a recipe, or an overlay of one (flows.pipeline).
        overrides: {"section.key": value}, written into params.yaml.
        until: run only up to this stage (and what it depends on).
    """
    logger = get_run_logger()
    variant = find_project(params_file)
    root = variant.root
    overrides = {**variant.overrides, **(overrides or {})}
    if url_list is not None:
        overrides["download.url_list"] = url_list_override(root, url_list)
    require_repo(root)
    params = preview(root, overrides, variant.recipe)
    with WorkspaceLock(root, timeout=params.pipeline.lock_timeout, owner=_owner()):
        last = last_promoted(root, params.pipeline.tag_prefix)
        if last is not None:
            continue_from(root, last.tag, params)
        result = run_pipeline(root, overrides, until, variant.recipe)
        params = load_params(root / PARAMS_FILE)
        settings = params.pipeline
        files = sorted({relative_name(spec.file, root) for spec in settings.gate})
        before = metrics_at(root, last.tag, files) if last else None
        after = read_metrics(root, files)
        report = compare(before, after, settings.gate, root, last.tag if last else None)
        logger.info("gate: %s", report.summary())
        stages = dvc.list_stages(root)
        comparison, page = compare_runs(root, last.tag if last else None, report, params, stages)
        promoted = None
        paths = record_paths(root, stages)
        if report.passed:
            left_out = dirty_tracked(root, exclude=paths)
            if left_out:
                logger.warning("uncommitted changes not part of the promotion commit (commit them so the "
                               "promoted model's code is in git too): %s", ", ".join(left_out[:20]))
            message = f"Promote the vlkd model: {report.summary()}"
            promoted = promote(root, settings.tag_prefix, paths, message)
            if last is not None and promoted.tag == last.tag:
                logger.info("nothing changed since %s: it stays the promoted model", last.tag)
                promoted = None
            else:
                logger.info("promoted as %s (commit %s)", promoted.tag, promoted.commit[:12])
        elif last is not None:
            logger.warning("not promoted: %s. The last promoted model stays %s; restore it with: %s",
                           report.summary(), last.tag, restore_command_at(root, last.tag, paths))
        else:
            logger.warning("not promoted: %s. No model has been promoted yet", report.summary())
        current = promoted.tag if promoted else (last.tag if last else None)
        result.update(gate=report.rows(), gate_passed=report.passed, gate_summary=report.summary(),
                      baseline=last.tag if last else None, promoted=promoted.tag if promoted else None,
                      current=current,
                      restore=restore_command_at(root, current, paths) if current else None,
                      comparison=str(page), changed_answers=answer_counts(comparison))
        publish_gate(report, result, markdown_summary(comparison, page))
    return result


def compare_runs(root: Path, baseline: str | None, report: GateReport, params, stages: list[dvc.Stage]
                 ) -> tuple[dict[str, Any], Path]:
    """This run against the promoted model it would replace, written to COMPARISON_FOLDER; (the
    comparison, its HTML page). Each piece it could not compare is logged in one line."""
    logger = get_run_logger()
    comparison = compare_with_promoted(root, baseline, report,
                                       [name for stage in stages for name in stage.metrics], params.evaluate,
                                       [folder for stage in stages for folder in stage.plots])
    page = write_comparison(comparison, root / COMPARISON_FOLDER)
    for line in [*answer_counts(comparison), *comparison["notes"]]:
        logger.info("comparison: %s", line)
    logger.info("comparison with %s: %s", baseline or "nothing promoted yet", page)
    return comparison, page


def continue_from(root: Path, tag: str, params) -> None:
    """Put the student `tag` promoted into `distill.init`, so that distillation continues from it on the
    rows it has not seen (plus a replayed sample of the rest) instead of starting over; DVC sees the
    folder as a dependency of distill. `distill.init: null` keeps every refresh a fresh start."""
    logger = get_run_logger()
    if params.distill.init is None:
        logger.info("distill.init is null: distillation starts a fresh student")
        return
    recorded = recorded_param(root, tag, "distill", "output")
    output = recorded if isinstance(recorded, str) else relative_name(params.distill.output, root)
    init = relative_name(params.distill.init, root)
    if output not in locked_outputs(root, tag):
        clear_folder(params.distill.init)
        logger.info("%s promoted no student (%s): distill.init %s is emptied, a fresh student", tag, output, init)
        return
    place_output_at(root, tag, output, params.distill.init)
    logger.info("distill.init %s: the student %s promoted (%s), to continue from", init, tag, output)


def publish_gate(report: GateReport, result: dict[str, Any], comparison_markdown: str) -> None:
    """The gate's table artifact, and a markdown artifact: the verdict, then `comparison_markdown` (every
    metric with the gated ones first, the changed answers, where the full comparison is)."""
    if result["promoted"]:
        verdict = f"**Promoted** as `{result['promoted']}`"
    elif result["gate_passed"] and result["current"]:
        verdict = f"**Unchanged** since `{result['current']}`, which stays the promoted model"
    else:
        verdict = f"**Not promoted**; the promoted model stays `{result['baseline'] or 'none'}`"
    restore = f"\n\nRestore it: `{result['restore']}`" if result["restore"] else ""
    rows = report.rows()
    if rows:
        create_table_artifact(key=GATE_ARTIFACT, table=rows,
                              description=f"Refresh gate against {report.baseline or 'nothing promoted yet'}")
    create_markdown_artifact(
        key=f"{GATE_ARTIFACT}-summary",
        description="vlkd refresh: every metric before and after (gated first), the changed answers, the promotion",
        markdown=(f"# vlkd refresh\n\n{verdict}: {report.summary()}.{restore}\n\n"
                  f"Stages re-run: {', '.join(result['ran']) or 'none'}\n\n{comparison_markdown}\n"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = arguments("Refresh the corpus, run the pipeline and promote the model if it passes the gate.")
    parser.add_argument("--url-list", help="the new version of the URL list")
    args = parser.parse_args(argv)
    try:
        result = refresh(url_list=args.url_list, params_file=args.params,
                         overrides=parse_assignments(args.overrides), until=args.until)
    except VlkdError as err:
        print("vlkd: error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    except dvc.StageFailed as err:
        print(f"vlkd: error: {err}", file=sys.stderr)
        return 1
    print_result(result, args.all_metrics)
    print()
    print(text_table(result["gate"], GATE_COLUMNS))
    print(f"\ngate: {result['gate_summary']}")
    print(f"promoted model: {result['current'] or 'none'}"
          + ("" if result["promoted"] or result["gate_passed"] else " (this run's model was not promoted)"))
    for line in result["changed_answers"]:
        print(line)
    print(f"comparison with {result['baseline'] or 'nothing promoted yet'} (every metric, changed answers, "
          f"curves): {result['comparison']} (comparison.json beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
