"""Scheduled retraining: serve the refresh flow on the cron in params.yaml (pipeline.schedule), and the
pipeline flow for runs started by hand, from this process.

    prefect server start                                         # a local server and its UI (SQLite)
    prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve [--params params.yaml]                 # serves until stopped
    prefect deployment run 'vlkd-refresh/vlkd-retrain'            # a run now, besides the schedule

Each run locks the workspace, so a scheduled run that finds another one running waits
(pipeline.lock_timeout) and then stops with a clear message; this process also runs one at a time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import serve
from prefect.schedules import Cron

from flows.pipeline import pipeline
from flows.refresh import refresh
from vlkd.config import PARAMS_FILE, load_params
from vlkd.errors import VlkdError
from vlkd.orchestrate.params import find_project

RETRAIN = "vlkd-retrain"
MANUAL = "vlkd-pipeline"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the vlkd deployments (scheduled retraining).")
    parser.add_argument("--params", default=PARAMS_FILE, help="the project's params.yaml")
    args = parser.parse_args(argv)
    try:
        served = deployments(args.params)
    except VlkdError as err:
        print("vlkd: error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    serve(*served, limit=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
