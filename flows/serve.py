"""Scheduled retraining: serve the refresh flow on the cron in params.yaml (pipeline.schedule), and the
pipeline flow for runs started by hand, from this process; and batch prediction with the last promoted
model (flows/predict.py), by hand or, with --predict-cron, on a schedule over one source.

    prefect server start                                         # a local server and its UI (SQLite)
    prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve [--params params.yaml]                 # serves until stopped
    prefect deployment run 'vlkd-refresh/vlkd-retrain'            # a run now, besides the schedule
    prefect deployment run 'vlkd-predict/vlkd-predict' --param source=/data/incoming --param question="..."
    python -m flows.serve --predict-source data/incoming --predict-question "..." --predict-cron "0 4 * * *"

Each pipeline or refresh run locks the workspace, so a scheduled run that finds another one running waits
(pipeline.lock_timeout) and then stops with a clear message; this process also runs one at a time, a
prediction included (it takes no lock: it writes no DVC output). A prediction's paths given with a run are
taken relative to this process's working directory: give absolute ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.pipeline import pipeline
from flows.predict import batch_predict
from flows.refresh import refresh
from vlkd.config import PARAMS_FILE, ScheduleParams, load_params
from vlkd.errors import VlkdError
from vlkd.orchestrate.params import find_project

RETRAIN = "vlkd-retrain"
MANUAL = "vlkd-pipeline"
PREDICT = "vlkd-predict"


def deployments(params_file: str = PARAMS_FILE) -> list:
    """The retraining deployment (refresh flow, on the schedule) and a manual one (pipeline flow)."""
    root = find_project(params_file).root
    params_path = str(Path(root) / PARAMS_FILE)
    schedule = load_params(Path(params_path)).pipeline.schedule
    retrain = refresh.to_deployment(
        name=RETRAIN,
        schedules=[Cron(schedule.cron, timezone=schedule.timezone, active=schedule.active)],
        parameters={"params_file": params_path},
        description=f"Scheduled retraining of {root}: refresh the corpus, run the pipeline, promote if no "
                    "gated metric got worse.",
        tags=["vlkd"],
    )
    manual = pipeline.to_deployment(name=MANUAL, parameters={"params_file": params_path},
                                    description=f"The vlkd pipeline of {root}, started by hand.", tags=["vlkd"])
    return [retrain, manual]


def prediction_deployment(params_file: str = PARAMS_FILE, source: str | None = None, question: str | None = None,
                          task: str = "vqa", cron: str | None = None) -> RunnerDeployment:
    """Batch prediction with the last promoted model: by hand (the source given with the run, or `source`),
    or, with `cron`, on that schedule over `source` (a folder where new images land; each run writes beside
    it, named after the model it used). The cron is this deployment's own, not pipeline.schedule's (which
    says when to retrain); its timezone is pipeline.schedule's."""
    root = find_project(params_file).root
    params_path = str(Path(root) / PARAMS_FILE)
    if cron is not None and source is None:
        raise VlkdError("a prediction schedule needs a source to predict on; pass --predict-source with "
                        "--predict-cron")
    timezone = load_params(Path(params_path)).pipeline.schedule.timezone
    schedules = [] if cron is None else [_cron(cron, timezone)]
    given = {"source": str(Path(source).expanduser().resolve())} if source else {}
    parameters = {"params_file": params_path, "task": task, **given, **({"question": question} if question else {})}
    return batch_predict.to_deployment(
        name=PREDICT, schedules=schedules, parameters=parameters, tags=["vlkd"],
        description=f"Batch prediction with the last promoted model of {root}"
                    + (f", {cron} ({timezone}) over {given['source']}" if cron else ", started by hand") + ".")


def _cron(cron: str, timezone: str) -> Cron:
    """A Cron schedule, its expression checked as pipeline.schedule's is (one line naming the flag)."""
    try:
        checked = ScheduleParams(cron=cron, timezone=timezone)
    except ValueError as err:
        raise VlkdError(f"--predict-cron {cron!r}: needs 5 fields (minute hour day month weekday), e.g. "
                        "'0 4 * * *'") from err
    return Cron(checked.cron, timezone=checked.timezone)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the vlkd deployments (scheduled retraining, "
                                     "batch prediction).")
    parser.add_argument("--params", default=PARAMS_FILE, help="the project's params.yaml")
    parser.add_argument("--predict-source", help="what the prediction deployment predicts on by default (a folder "
                        "of images or shards, or a .parquet/.jsonl of requests)")
    parser.add_argument("--predict-question", help="its question for every image (VQA on a folder or shards)")
    parser.add_argument("--predict-task", default="vqa", choices=("vqa", "caption"))
    parser.add_argument("--predict-cron", help="run the prediction on this cron (needs --predict-source); "
                        "default: by hand only")
    args = parser.parse_args(argv)
    try:
        served = [*deployments(args.params),
                  prediction_deployment(args.params, args.predict_source, args.predict_question, args.predict_task,
                                        args.predict_cron)]
    except VlkdError as err:
        print("vlkd: error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    serve(*served, limit=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
