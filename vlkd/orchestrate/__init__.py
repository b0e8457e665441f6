"""What the Prefect flows (flows/) do, as plain functions with no Prefect inside.

    lock.py      one pipeline run per workspace (a file lock that waits, then says who holds it)
    params.py    find the project, apply `key=value` overrides to params.yaml (comments kept)
    process.py   run a command, stream its output line by line, credentials redacted
    stages.py    the stages as DVC sees them (dvc.yaml, in dependency order), `dvc repro` one at a time
    metrics.py   the metric files the stages declare, flattened to rows and tables
    gate.py      compare new metrics with the last promoted model's, with tolerances
    promote.py   promotion in git: a commit of dvc.lock, params and metrics, and a numbered tag
"""
