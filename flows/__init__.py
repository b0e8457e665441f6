"""Prefect flows over the DVC pipeline: run it (pipeline.py), refresh the corpus behind a promotion
gate (refresh.py), and serve both on a schedule (serve.py). The work itself is in vlkd.orchestrate."""
