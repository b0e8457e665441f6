"""The protocol's HTML page: per task and test split, score against training fraction (one line per variant,
the spread over seeds as error bars) and the table of gains over no distillation. Self-contained SVG: no
plotting library is installed for this."""

from __future__ import annotations

import html
import math
from pathlib import Path

COLOURS = {"none": "#555", "naive": "#1f77b4", "clip-td": "#d62728", "select-only": "#2ca02c",
           "weight-only": "#9467bd"}
SPLIT_NAMES = {"test": "in-domain test", "shifted": "domain-shifted test"}


def write_report(path: Path, metrics: dict) -> None:
    parts = ["<!doctype html><meta charset=utf-8><title>vlkd finetune: CLIP-TD</title>",
             "<style>body{font-family:sans-serif;margin:24px}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}svg{border:1px solid #ddd}</style>",
             "<h1>CLIP-TD: task fine-tuning with targeted distillation</h1>"]
    for task, table in metrics.items():
        sizes = ", ".join(f"{split} {count}" for split, count in table["sizes"].items())
        parts.append(f"<h2>{html.escape(task)}</h2><p>examples: {sizes}; labels: {table['labels']}</p>")
        for split in ("test", "shifted"):
            if split in table:
                parts.append(f"<h3>{SPLIT_NAMES[split]}</h3>{chart(table[split])}{gains_table(table[split])}")
    Path(path).write_text("\n".join(parts) + "\n", encoding="utf-8")


def chart(by_variant: dict, width: int = 520, height: int = 300) -> str:
    """Score (mean over seeds, bars: one standard deviation) against fraction on a log axis."""
    points = [(float(f), cell["mean"], cell["std"]) for cells in by_variant.values() for f, cell in cells.items()]
    if not points:
        return ""
    low_x, high_x = math.log10(min(p[0] for p in points)), math.log10(max(p[0] for p in points))
    low_y = min(p[1] - p[2] for p in points)
    high_y = max(p[1] + p[2] for p in points)
    margin = 45

    def x(f: float) -> float:
        return margin + (math.log10(f) - low_x) / max(high_x - low_x, 1e-9) * (width - 2 * margin)

    def y(v: float) -> float:
        return height - margin - (v - low_y) / max(high_y - low_y, 1e-9) * (height - 2 * margin)

    svg = [f"<svg width={width} height={height}>"]
    for f in sorted({p[0] for p in points}):
        svg.append(f"<text x={x(f):.0f} y={height - margin + 16} font-size=11 text-anchor=middle>{f:g}</text>")
    for v in (low_y, (low_y + high_y) / 2, high_y):
        svg.append(f"<text x={margin - 6} y={y(v) + 4:.0f} font-size=11 text-anchor=end>{v:.1f}</text>")
    svg.append(f"<text x={width / 2:.0f} y={height - 8} font-size=12 text-anchor=middle>training fraction</text>")
    svg.append(f"<text x=12 y={height / 2:.0f} font-size=12 text-anchor=middle transform='rotate(-90 12 "
               f"{height / 2:.0f})'>score</text>")
    for legend, (variant, cells) in enumerate(by_variant.items()):
        colour = COLOURS.get(variant, "#000")
        line = sorted((float(f), cell["mean"], cell["std"]) for f, cell in cells.items())
        svg.append(f"<polyline fill=none stroke='{colour}' stroke-width=2 points='"
                   + " ".join(f"{x(f):.1f},{y(m):.1f}" for f, m, _ in line) + "'/>")
        for f, m, s in line:
            svg.append(f"<line x1={x(f):.1f} x2={x(f):.1f} y1={y(m - s):.1f} y2={y(m + s):.1f} stroke='{colour}'/>")
        svg.append(f"<text x={margin + 5} y={14 + 14 * legend} font-size=12 fill='{colour}'>{variant}</text>")
    return "".join(svg) + "</svg>"


def gains_table(by_variant: dict) -> str:
    fractions = sorted({float(f) for cells in by_variant.values() for f in cells})
    head = "".join(f"<th>{f:g}</th>" for f in fractions)
    rows = []
    for variant, cells in by_variant.items():
        row = []
        for f in fractions:
            cell = cells.get(str(f))
            if cell is None:
                row.append("<td></td>")
                continue
            gain = (f"<br><small>{cell['gain_mean']:+.2f} ± {cell['gain_std']:.2f}</small>"
                    if "gain_mean" in cell else "")
            row.append(f"<td>{cell['mean']:.2f} ± {cell['std']:.2f}{gain}</td>")
        rows.append(f"<tr><th>{html.escape(variant)}</th>{''.join(row)}</tr>")
    return (f"<table><tr><th>variant \\ fraction</th>{head}</tr>{''.join(rows)}</table>"
            "<p><small>score: mean ± standard deviation over seeds; below it the gain over <i>none</i> "
            "(per seed, then mean ± standard deviation)</small></p>")
