"""The metric files the stages declare in dvc.yaml, flattened to rows for tables and the gate."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def read_metrics(root: Path, files: Iterable[str]) -> dict[str, dict]:
    """{file: its JSON} for each file that exists and parses (YAML metric files too)."""
    found: dict[str, dict] = {}
    for name in files:
        path = root / name
        if not path.is_file():
            continue
        data = parse_metrics(path.read_text(), name)
        if data is not None:
            found[name] = data
    return found


def parse_metrics(text: str, name: str = "") -> dict | None:
    try:
        if name.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception:  # not JSON (ValueError) or not YAML (yaml.YAMLError): not a metrics file
        return None
    return data if isinstance(data, dict) else None


def flatten_numbers(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves under dotted keys ({"vqa": {"overall": 0.5}} -> {"vqa.overall": 0.5}); lists,
    strings and booleans are left out."""
    flat: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_numbers(value, name + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = value
    return flat


def lookup(data: Mapping[str, Any], key: str) -> float | None:
    """A dotted key's numeric value; keys that themselves hold dots are found too."""
    value = flatten_numbers(data).get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def metric_rows(metrics: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per numeric metric: {"file", "metric", "value"}."""
    return [{"file": name, "metric": key, "value": value}
            for name, data in metrics.items() for key, value in flatten_numbers(data).items()]


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "_(none)_"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def text_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    """A plain aligned table for a terminal."""
    if not rows:
        return "(no metrics)"
    columns = columns or list(rows[0])
    cells = [columns] + [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in cells]
    out.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(out)
