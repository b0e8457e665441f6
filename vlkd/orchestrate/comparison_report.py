"""The comparison of a run with the promoted model (vlkd.orchestrate.compare) as files and text: comparison.json,
one self-contained HTML page (tables, the changed answers, the curves as inline SVG; no scripts) and the
markdown of the refresh flow's artifact."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlkd.io import write_json_atomic
from vlkd.orchestrate.metrics import fmt, markdown_table

HTML_NAME = "comparison.html"
JSON_NAME = "comparison.json"
METRIC_COLUMNS = ["metric", "file", "promoted", "new", "change", "allowed worsening", "verdict"]
ANSWER_COLUMNS = ["question", "promoted", "new", "score change"]


# ---------------------------------------------------------------------------------------------------
# Output: JSON, HTML, the markdown of the flow's artifact
# ---------------------------------------------------------------------------------------------------
def write_comparison(comparison: Mapping[str, Any], folder: Path) -> Path:
    """comparison.json and comparison.html in `folder` (created); returns the HTML's path."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / JSON_NAME, dict(comparison))
    page = folder / HTML_NAME
    partial = page.with_name(f".{HTML_NAME}.partial")
    partial.write_text(render_html(comparison))
    partial.replace(page)  # a browser open on the page never reads half of it
    return page


def answer_counts(comparison: Mapping[str, Any]) -> list[str]:
    """One line per benchmark: how many answers or captions changed."""
    return [f"{name}: {counts(result)}" for name, result in comparison["answers"].items()]


def counts(result: Mapping[str, Any]) -> str:
    """A benchmark's changed answers (or captions) in words."""
    if result["task"] == "caption":
        return f"{result['changed']} of {result['images']} captions changed"
    return (f"{result['changed']} of {result['questions']} answers changed ({result['improved']} improved, "
            f"{result['worsened']} worse; accuracy {fmt(result['overall']['promoted'])} -> "
            f"{fmt(result['overall']['new'])})")


def markdown_summary(comparison: Mapping[str, Any], page: Path, top: int = 5) -> str:
    """The comparison's sections for the flow's markdown artifact: where the HTML is, the changed answers'
    counts and the top of each sample, what could not be compared, every metric (gated first; last, as the
    table is long)."""
    baseline = comparison["baseline"] or "-"
    parts = [f"Comparison with `{baseline}` (every metric, the changed answers, the curves): `{page}`"]
    if comparison["answers"]:
        parts.append("## Changed answers\n\n" + "\n".join(f"- {line}" for line in answer_counts(comparison)))
        for name, result in comparison["answers"].items():
            rows = [_answer_cells(item) for item in result["sample"][:top]] if result["task"] == "vqa" else []
            if rows:
                parts.append(f"### {name}: the largest changes of the sample\n\n{markdown_table(rows, ANSWER_COLUMNS)}")
    if comparison["notes"]:
        parts.append("## Not compared\n\n" + "\n".join(f"- {note}" for note in comparison["notes"]))
    parts.append(f"## Every metric (promoted `{baseline}` → new), gated first\n\n"
                 f"{markdown_table([_metric_cells(row) for row in comparison['metrics']], METRIC_COLUMNS)}")
    return "\n\n".join(parts)


def _metric_cells(row: Mapping[str, Any]) -> dict[str, Any]:
    return {**row, "change": _signed(row["change"])}


def _answer_cells(item: Mapping[str, Any]) -> dict[str, Any]:
    return {"question": item["question"] or item["question_id"],
            "promoted": f"{item['promoted']} ({fmt(item['promoted_score'])}%)",
            "new": f"{item['new']} ({fmt(item['new_score'])}%)", "score change": _signed(item["score_change"])}


def _signed(value: float | None) -> str:
    if value is None:
        return "-"
    return ("+" if value > 0 else "") + fmt(value)


# The page: one file, no scripts, charts as inline SVG.
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
th { background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.same td { color: #999; } .up { color: #2b8a3e; } .down { color: #c92a2a; }
.verdict { font-weight: 600; } .worse, .missing { color: #c92a2a; } .better { color: #2b8a3e; }
.notes { background: #fff8e1; border: 1px solid #f0d48a; padding: 8px 12px 8px 28px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } .legend span { margin-right: 16px; }
.swatch { display: inline-block; width: 18px; height: 3px; vertical-align: middle; margin-right: 4px; }
.muted { color: #777; }
"""
# The promoted line wide and pale under this run's: where the two runs agree, both stay visible.
LINES = {"promoted": ("#adb5bd", 3.2), "new": ("#e8590c", 1.4)}


def render_html(comparison: Mapping[str, Any]) -> str:
    """The comparison as one self-contained page."""
    baseline = comparison["baseline"]
    title = f"This run against {baseline}" if baseline else "This run (nothing promoted yet)"
    body = [f"<h1>{_e(title)}</h1>", f"<p class=muted>Gate: {_e(comparison['gate'])}</p>"]
    if comparison["notes"]:
        body.append("<ul class=notes>" + "".join(f"<li>{_e(note)}</li>" for note in comparison["notes"]) + "</ul>")
    gated = [row for row in comparison["metrics"] if row["gated"]]
    if gated:
        body += ["<h2>Gated metrics</h2>", _metric_table(gated)]
    body += _answers_html(comparison["answers"])
    body += _curves_html(comparison["curves"])
    body += ["<h2>Every metric</h2>", _metric_table(comparison["metrics"])]
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _metric_table(rows: list[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{_e(column)}</th>" for column in METRIC_COLUMNS)
    lines = []
    for row in rows:
        unchanged = row["change"] == 0 and not row["gated"]
        verdict = row["verdict"] or ""
        lines.append(f"<tr class='{'same' if unchanged else ''}'><td>{_e(row['metric'])}</td>"
                     f"<td>{_e(row['file'])}</td><td class=num>{_e(fmt(row['promoted']))}</td>"
                     f"<td class=num>{_e(fmt(row['new']))}</td><td class=num>{_e(_signed(row['change']))}</td>"
                     f"<td class=num>{_e(fmt(row['allowed worsening']) if row['gated'] else '')}</td>"
                     f"<td class='verdict {_e(verdict.replace(' ', '-'))}'>{_e(verdict)}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(lines)}</table>"


def _answers_html(answers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not answers:
        return []
    parts = ["<h2>Changed answers</h2>"]
    for name, result in answers.items():
        parts.append(f"<h3>{_e(name)}</h3>")
        shown = ("; a seeded sample, the largest score changes first" if result["task"] == "vqa"
                 else "; a seeded sample")
        parts.append(f"<p>{_e(counts(result))}{shown if result['sample'] else ''}</p>")
        if result["sample"]:
            parts.append(_vqa_sample(result["sample"]) if result["task"] == "vqa"
                         else _caption_sample(result["sample"]))
    return parts


def _vqa_sample(sample: list[Mapping[str, Any]]) -> str:
    rows = []
    for item in sample:
        change = item["score_change"]
        tone = "up" if change > 0 else "down" if change < 0 else ""
        rows.append(f"<tr><td>{_e(item['question'] or '')} <span class=muted>#{_e(item['question_id'])}, image "
                    f"{_e(item['image_id'])}</span></td><td>{_e(item['promoted'])}</td>"
                    f"<td class='num muted'>{_e(fmt(item['promoted_score']))}</td><td>{_e(item['new'])}</td>"
                    f"<td class='num muted'>{_e(fmt(item['new_score']))}</td>"
                    f"<td class='num {tone}'>{_e(_signed(change))}</td></tr>")
    return ("<table><tr><th>question</th><th>promoted</th><th>score %</th><th>new</th><th>score %</th>"
            "<th>change</th></tr>" + "".join(rows) + "</table>")


def _caption_sample(sample: list[Mapping[str, Any]]) -> str:
    rows = [f"<tr><td class=num>{_e(item['image_id'])}</td><td>{_e(item['promoted'])}</td><td>{_e(item['new'])}</td>"
            f"<td class=muted>{_e(item['reference'] or '')}</td></tr>" for item in sample]
    return ("<table><tr><th>image</th><th>promoted</th><th>new</th><th>a reference</th></tr>" + "".join(rows)
            + "</table>")


def _curves_html(curves: list[Mapping[str, Any]]) -> list[str]:
    if not curves:
        return []
    drawn = [side for side in LINES if any(curve[side] for curve in curves)]
    legend = "".join(f"<span><i class=swatch style='background:{LINES[side][0]}'></i>"
                     f"{'this run' if side == 'new' else side}</span>" for side in drawn)
    charts = "".join(svg_chart(curve["name"], {side: curve[side] for side in LINES}) for curve in curves)
    return ["<h2>Distillation curves</h2>", f"<p class=legend>{legend}</p>", f"<div class=charts>{charts}</div>"]


def svg_chart(title: str, lines: Mapping[str, list | None], width: int = 340, height: int = 190) -> str:
    """A small line chart: one polyline per side ({side: [[x, y]]}; a side with None is left out), axes
    labelled at their ends, the title above."""
    left, right, top, bottom = 58, 12, 24, 30
    points = [point for line in lines.values() if line for point in line]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x_span, y_span = (x1 - x0) or 1.0, (y1 - y0) or abs(y1) or 1.0

    def at(point: list) -> str:
        x = left + (point[0] - x0) / x_span * (width - left - right)
        y = top + (1 - (point[1] - y0) / y_span) * (height - top - bottom)
        return f"{x:.1f},{y:.1f}"

    plot = [f"<rect x={left} y={top} width={width - left - right} height={height - top - bottom} "
            "fill=none stroke='#ccc'/>",
            f"<text x={width / 2:.0f} y=15 text-anchor=middle font-weight=600>{_e(title)}</text>",
            f"<text x={left - 4} y={top + 4} text-anchor=end>{_e(fmt(y1))}</text>",
            f"<text x={left - 4} y={height - bottom} text-anchor=end>{_e(fmt(y0))}</text>",
            f"<text x={left} y={height - bottom + 14}>{_e(fmt(x0))}</text>",
            f"<text x={width - right} y={height - bottom + 14} text-anchor=end>{_e(fmt(x1))}</text>",
            f"<text x={(left + width - right) / 2:.0f} y={height - 4} text-anchor=middle fill='#777'>step</text>"]
    for side, line in lines.items():
        colour, width_px = LINES.get(side, ("#333", 1.4))
        if line:
            plot.append(f"<polyline fill=none stroke='{colour}' stroke-width={width_px} stroke-linejoin=round "
                        f"points='{' '.join(at(point) for point in line)}'><title>{_e(side)}</title></polyline>")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width={width} height={height} font-size=11 "
            f"font-family=sans-serif role=img aria-label='{_e(title)}'>{''.join(plot)}</svg>")
