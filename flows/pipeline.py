"""The pipeline as a Prefect flow: one task per DVC stage, DVC deciding what is up to date.

    lock the workspace -> write overrides into params.yaml -> each stage of dvc.yaml once the stages it
    needs are done (`pipeline.concurrent_stages` at a time): `dvc repro --single-item <stage>` (a task; its
    output streamed into the run's log; retried after transient failures) -> `dvc push` -> artifacts: the
    metrics table and a link to the report

A stage that fails leaves the stages before it as they were recorded in dvc.lock, and its own last
good outputs are put back from DVC's cache. Nothing of a run is pushed or promoted unless every stage
succeeded.

    python -m flows.pipeline [--params params.yaml] [--set teacher.epochs=2 ...] [--until features]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run

from vlkd.config import PARAMS_FILE, Params, load_params
from vlkd.errors import VlkdError
from vlkd.orchestrate import stages as dvc
from vlkd.orchestrate.gate import relative_name
from vlkd.orchestrate.lock import WorkspaceLock
from vlkd.orchestrate.metrics import markdown_table, metric_rows, read_metrics, text_table
from vlkd.orchestrate.params import apply_overrides, find_project, parse_assignments, preview, use_recipe
from vlkd.orchestrate.process import Redactor, command_env, secret_values

METRICS_ARTIFACT = "vlkd-metrics"
RUN_ARTIFACT = "vlkd-run"


# ---------------------------------------------------------------------------------------------------
# Credentials: from the environment or Prefect Secret blocks; redacted from everything logged
# ---------------------------------------------------------------------------------------------------
def stage_environment(secrets: dict[str, str]) -> tuple[dict[str, str], Redactor]:
    """The stage commands' environment (with the values of the Secret blocks named in
    `pipeline.secrets`) and a redactor that masks every credential in it."""
    extra = {}
    if secrets:
        from prefect.blocks.system import Secret

        for variable, block in secrets.items():
            try:
                value = Secret.load(block).get()
            except ValueError as err:
                raise VlkdError(f"pipeline.secrets.{variable}: no Prefect Secret block named {block!r}; create it "
                                f"(prefect.blocks.system.Secret(value=...).save({block!r})) or remove the entry"
                                ) from err
            extra[variable] = value if isinstance(value, str) else str(value)
    env = command_env(extra)
    return env, Redactor([*secret_values(env), *extra.values()])


# ---------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------
def _transient(task, task_run, state) -> bool:
    """Retry a stage unless it failed on bad input (a retry would fail the same way)."""
    try:
        state.result()
    except dvc.StageFailed as err:
        return not err.permanent
    except VlkdError:
        return False
    except Exception:
        return True
    return False


@task(name="stage", task_run_name="{stage}", cache_policy=NO_CACHE, retry_condition_fn=_transient)
def run_stage(project: str, stage: str, secrets: dict[str, str]) -> dict[str, Any]:
    """`dvc repro --single-item <stage>`: DVC skips it if nothing it depends on changed."""
    logger = get_run_logger()
    env, redact = stage_environment(secrets)
    logger.info("dvc repro --single-item %s", stage)
    try:
        run = dvc.repro(Path(project), stage, logger.info, env=env, redact=redact)
    except dvc.StageFailed as err:
        logger.error("stage %s failed: %s%s", stage, err.reason,
                     "" if err.permanent else " (may be transient: retried if retries are left)")
        raise
    logger.info("stage %s: %s in %.1f s", stage, run.status, run.seconds)
    return {"stage": stage, "status": run.status, "seconds": run.seconds}


@task(name="dvc push", cache_policy=NO_CACHE, retry_condition_fn=_transient)
def push_outputs(project: str, secrets: dict[str, str]) -> None:
    """`dvc push` everything dvc.lock records to the default remote."""
    logger = get_run_logger()
    env, redact = stage_environment(secrets)
    dvc.push(Path(project), logger.info, env=env, redact=redact)


# ---------------------------------------------------------------------------------------------------
# The run (shared with the refresh flow, which holds the same lock)
# ---------------------------------------------------------------------------------------------------
def run_pipeline(root: Path, overrides: dict[str, Any], until: str | None = None,
                 recipe: Path | None = None) -> dict[str, Any]:
    """Inside a flow, with the workspace lock held: the recipe and overrides, every stage, push, artifacts."""
    logger = get_run_logger()
    if use_recipe(root, recipe):
        logger.info(f"params.yaml: the recipe {recipe}")
    changed = apply_overrides(root, overrides)
    params = load_params(root / PARAMS_FILE)
    settings = params.pipeline
    _, redact = stage_environment({})
    for key, (old, new) in changed.items():
        logger.info(redact(f"params.yaml: {key} = {new!r} (was {old!r})"))
    stages = dvc.plan(root, until)
    logger.info("stages: %s", " -> ".join(stage.name for stage in stages))
    runs = run_stages(root, stages, settings)
    if settings.push:
        push_outputs.with_options(retries=settings.retries, retry_delay_seconds=settings.retry_delay_seconds)(
            str(root), dict(settings.secrets))
    metrics = read_metrics(root, [name for stage in stages for name in stage.metrics])
    rows = metric_rows(metrics)
    report = Path(settings.report)
    report = report if report.is_absolute() else root / report
    result = {
        "project": str(root),
        "stages": runs,
        "ran": [item["stage"] for item in runs if item["status"] == "ran"],
        "metrics": rows,
        "report": str(report) if report.is_file() else None,
        "pushed": settings.push,
        "scorecard": sorted({relative_name(spec.file, root) for spec in settings.gate}),
        "overrides": {key: new for key, (_, new) in changed.items()},
    }
    publish(result, params)
    return result


def run_stages(root: Path, stages: list[dvc.Stage], settings) -> list[dict[str, Any]]:
    """Each stage as a task once the stages it needs are done, up to `settings.concurrent_stages` at a time
    (stages that do not need each other, e.g. the teacher's branch and the language model). After a failure
    no new stage starts; the ones running finish, and the failed stage's last good outputs are put back."""
    logger = get_run_logger()
    run = run_stage.with_options(retries=settings.retries, retry_delay_seconds=settings.retry_delay_seconds)
    secrets = dict(settings.secrets)
    pending, running, runs, failed = list(stages), {}, [], []
    while pending or running:
        done = {item["stage"] for item in runs}
        ready = [stage for stage in pending if set(stage.needs) <= done]
        for stage in ready[:max(0, settings.concurrent_stages - len(running))] if not failed else []:
            pending.remove(stage)
            running[stage.name] = (run.submit(str(root), stage.name, secrets), dvc.Snapshot(root, stage), stage)
        if not running:
            break
        finished = next(as_completed([future for future, _, _ in running.values()]))
        name = next(key for key, (future, _, _) in running.items() if future is finished)
        _, snapshot, stage = running.pop(name)
        try:
            runs.append(finished.result())
        except BaseException as err:
            failed.append((stage, err))
            _put_back(snapshot, stage, secrets, logger)
        finally:
            snapshot.discard()
    order = [stage.name for stage in stages]
    runs.sort(key=lambda item: order.index(item["stage"]))
    if failed:
        stage, err = failed[0]
        done = ", ".join(item["stage"] for item in runs) or "none"
        logger.error("stage %s failed; the stages that finished are recorded in dvc.lock (%s)", stage.name, done)
        raise err
    return runs


def _put_back(snapshot: dvc.Snapshot, stage: dvc.Stage, secrets: dict[str, str], logger) -> None:
    try:
        env, redact = stage_environment(secrets)
        restored = snapshot.restore(logger.info, env=env, redact=redact)
    except Exception as err:  # keep the stage's own error as the run's error
        logger.error("could not put the last good outputs of %s back: %s", stage.name, err)
        restored = []
    logger.error("stage %s failed; its last good outputs were put back: %s", stage.name, ", ".join(restored) or "none")


def publish(result: dict[str, Any], params: Params) -> None:
    """The run's artifacts: the metrics table, and a summary with the stages and the report link."""
    if result["metrics"]:
        create_table_artifact(key=METRICS_ARTIFACT, table=result["metrics"],
                              description=f"Metrics of the vlkd pipeline in {result['project']}")
    report = result["report"]
    link = (f"[{Path(report).name}]({Path(report).as_uri()}) (`{report}`)" if report
            else f"not written by this pipeline (expected at `{params.pipeline.report}`)")
    stages = markdown_table(result["stages"], ["stage", "status", "seconds"])
    create_markdown_artifact(
        key=RUN_ARTIFACT,
        description="vlkd pipeline run: stages, metrics and the report",
        markdown=(f"# vlkd pipeline run\n\nProject: `{result['project']}`\n\nReport: {link}\n\n"
                  f"## Stages\n\n{stages}\n\n## Metrics\n\n"
                  f"{markdown_table(result['metrics'], ['file', 'metric', 'value'])}\n"),
    )


def _owner() -> str:
    return f"Prefect flow run {flow_run.get_name() or flow_run.get_id() or '?'}"


@flow(name="vlkd-pipeline")
def pipeline(params_file: str = PARAMS_FILE, overrides: dict[str, Any] | None = None,
             until: str | None = None) -> dict[str, Any]:
    """Run the DVC pipeline stage by stage.

    Args:
        params_file: the project's params.yaml (its folder holds dvc.yaml), a recipe that params.yaml becomes
            a copy of, or an overlay: the recipe it names (`base:`) with its values over it.
        overrides: {"section.key": value}, written into params.yaml like `dvc exp run -S`.
        until: run only this stage and the stages it depends on (as `dvc repro <stage>`).
    """
    variant = find_project(params_file)
    overrides = {**variant.overrides, **(overrides or {})}
    params = preview(variant.root, overrides, variant.recipe)
    with WorkspaceLock(variant.root, timeout=params.pipeline.lock_timeout, owner=_owner()):
        return run_pipeline(variant.root, overrides, until, variant.recipe)


# ---------------------------------------------------------------------------------------------------
# Command line (`make demo`)
# ---------------------------------------------------------------------------------------------------
def print_result(result: dict[str, Any], all_metrics: bool = False) -> None:
    """The stages, the scorecard (the metric files the gate reads; every file with `all_metrics` or
    when none of those was written) and where the report is."""
    rows = result["metrics"]
    scorecard = [row for row in rows if row["file"] in result.get("scorecard", ())]
    shown = rows if all_metrics or not scorecard else scorecard
    print()
    print(text_table(result["stages"], ["stage", "status", "seconds"]))
    print()
    print(text_table(shown, ["file", "metric", "value"]))
    if len(shown) < len(rows):
        print(f"({len(rows) - len(shown)} more metrics of the other stages: --all-metrics, `dvc metrics show`, "
              f"or the {METRICS_ARTIFACT} artifact)")
    print()
    print(f"report: {result['report'] or 'not written by this pipeline'}")


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=PARAMS_FILE,
                        help="params.yaml of the project, a recipe, or an overlay of one")
    parser.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter in params.yaml (as `dvc exp run -S`); repeatable")
    parser.add_argument("--until", help="run only this stage and the stages it depends on")
    parser.add_argument("--all-metrics", action="store_true", help="print every stage's metrics, not only the "
                        "scorecard (the files pipeline.gate reads)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments("Run the vlkd pipeline through Prefect and DVC.").parse_args(argv)
    try:
        result = pipeline(params_file=args.params, overrides=parse_assignments(args.overrides), until=args.until)
    except VlkdError as err:
        print("vlkd: error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    except dvc.StageFailed as err:
        print(f"vlkd: error: {err}", file=sys.stderr)
        return 1
    print_result(result, args.all_metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
