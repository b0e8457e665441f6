"""What every `vlkd` command shares: bad input as one line and exit code 2, the --metrics / --run-log
options and how they are written, quieter transformers."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import click

from vlkd.errors import VlkdError
from vlkd.io import write_json_atomic


def reports_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VlkdError as err:
            click.echo("vlkd: error: " + " ".join(str(err).split()), err=True)
            sys.exit(2)
    return wrapper


def metrics_option(command):
    """--metrics (what the stage made: part of the run's record, the same bytes for the same inputs) and
    --run-log (how this run went: seconds, throughput, what it computed or skipped)."""
    command = click.option(
        "--run-log", "run_log", type=click.Path(path_type=Path),
        help="Write this run's facts (seconds, throughput, what was computed or skipped) to this JSON file; "
        "they are kept out of the stage's outputs and metrics, which depend on the inputs only.")(command)
    return click.option(
        "--metrics", "metrics_file", type=click.Path(path_type=Path),
        help="Also write the stage's metrics to this JSON file (for `dvc metrics`, outside the stage's "
        "outputs).")(command)


def quiet_transformers() -> None:
    """No progress bars for loading and saving a few-MB model: they would bury the stage's own lines."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process and of its largest finished child (DataLoader workers,
    img2dataset's processes), in MiB; Linux reports KiB."""
    import resource

    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_children_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def write_metrics(path: Path | None, run_log: Path | None, result: dict, started: float) -> None:
    """The stage's metrics without `this_run`, and `this_run` in the run log with the whole command's seconds."""
    this_run = {**result.get("this_run", {}), "seconds": round(time.perf_counter() - started, 3),
                **peak_memory()}
    if "torch" in sys.modules:  # CPU results are identical only for the same number of threads
        this_run["torch_threads"] = sys.modules["torch"].get_num_threads()
    for target, record in ((path, {k: v for k, v in result.items() if k != "this_run"}), (run_log, this_run)):
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(target, record)
