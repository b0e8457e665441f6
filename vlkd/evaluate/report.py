"""The evaluation report: one self-contained HTML page (images inlined) a person would rather look at than
read: the metrics next to their controls, sample images with questions, answers, human answers and
scores, sample captions, and the distillation's training curves (from its dvclive files)."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from vlkd.config import EvaluateParams
from vlkd.io import project_relative

THUMBNAIL = 128
CONDITIONS = ("image", "blank", "shuffled", "text_only", "prior")
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ddd;border-radius:6px;padding:8px;width:430px}
.card img{float:left;margin-right:8px;image-rendering:pixelated}.good{color:#07641d}.bad{color:#a31515}
.small{font-size:85%;color:#555}svg{border:1px solid #ddd;margin:4px}
"""

_DECODING = {"free": "the answer is cut out of the model's rewrite of the prompt",
             "forced": "the decoder is given the prompt up to its mask and writes only the answer"}


def write_report(path: Path, metrics: dict, samples: dict, params: EvaluateParams) -> None:
    parts = [f"<!doctype html><meta charset=utf-8><title>vlkd evaluation</title><style>{_STYLE}</style>",
             "<h1>vlkd: zero-shot evaluation</h1>", _recipe(metrics.get("recipe")),
             f"<p class=small>student {html.escape(str(params.student))}, language model "
             f"{html.escape(str(params.plm))}; prompts <code>{html.escape(params.vqa_prompt)}</code> and "
             f"<code>{html.escape(params.caption_prompt)}</code> (VQA modes {', '.join(params.vqa_modes)}, "
             f"describing with <code>{html.escape(params.describe_prompt)}</code>), {params.num_beams} beams, "
             f"{params.decoding} decoding ({_DECODING[params.decoding]}), VQA normalisation {params.normalize}</p>",
             _summary_table(metrics, params), _retention(metrics.get("retention", {}))]
    ladders = [_ladder(name, metrics[name]) for name, spec in params.benchmarks.items()
               if spec.task == "vqa" and metrics[name].get("ladder")]
    if ladders:
        parts.append("<h2>The ladder of ceilings</h2><p class=small>The same questions, scored the same way, from "
                     "better evidence than the student's image prefix (top) down to the controls: where a point is "
                     "lost. description: the language model before distillation reads the image's true scene in "
                     "words; captions: it reads the image's human captions; gap closed: (student - blank) / "
                     "(rung - blank).</p>" + "".join(ladders))
    for name, spec in params.benchmarks.items():
        cards = _vqa_cards(samples[name]) if spec.task == "vqa" else _caption_cards(samples[name])
        parts.append(f"<h2>{html.escape(name)}: samples</h2><div class=cards>{cards}</div>")
    parts.append(_curves(params.curves))
    path.write_text(project_relative("\n".join(parts) + "\n", path), encoding="utf-8")


def _recipe(recipe: dict | None) -> str:
    """The student's recipe as the headline says it: VLKD as published, or with each extension named."""
    if not recipe:
        return ""
    extensions = recipe.get("extensions") or []
    note = ("; not in the paper: " + ", ".join(extensions) + " (docs/method.md)") if extensions else ""
    return (f"<p><b>Student: {html.escape(recipe['name'])}</b><br><span class=small>objectives "
            f"{' + '.join(recipe.get('objectives') or []) or 'none'}{html.escape(note)}</span></p>")


def _summary_table(metrics: dict, params: EvaluateParams) -> str:
    rows = []
    for name, spec in params.benchmarks.items():
        result = metrics[name]
        if spec.task == "vqa":
            for position, (mode, scores) in enumerate(result["modes"].items()):
                rows += _vqa_rows(name if position == 0 else "", mode, scores)
        else:
            rows.append(_row(name, "CIDEr", {"image": result["CIDEr"],
                                             **{c: control["CIDEr"] for c, control in result["controls"].items()}}))
            for key in ("Bleu_4", "METEOR", "ROUGE_L", "SPICE"):
                if key in result:
                    rows.append(_row("", key, {"image": result[key]}))
    header = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in CONDITIONS)
    first = params.vqa_modes[0]
    return (f"<h2>Metrics</h2><table><tr><th class=l>benchmark</th><th class=l>metric</th>{header}</tr>"
            + "".join(rows) + "</table><p class=small>image: the student with each image; blank: one grey image "
            "for all; shuffled: another image of the split; text only: the language model before distillation; "
            "prior: no model, each question gets its question type's most frequent human answer. VQA "
            f"modes: direct is the VLKD paper's inference (the student answers the question from the image); "
            f"describe is caption-then-read (the student describes the image, the language model before "
            f"distillation answers from the description). A benchmark's headline numbers are {first}'s.</p>")


def _vqa_rows(name: str, mode: str, scores: dict) -> list[str]:
    """One VQA mode's rows: its accuracy with the image and under each control, overall and per answer type."""
    controls = scores["controls"]
    label = f"VQA accuracy, {mode}" + (" (the paper's)" if mode == "direct" else "")
    rows = [_row(name, label, {"image": scores["overall"],
                               **{c: control["overall"] for c, control in controls.items()}})]
    for kind, value in scores["perAnswerType"].items():
        rows.append(_row("", f"  {kind}", {"image": value, **{c: control["perAnswerType"].get(kind, "")
                                                              for c, control in controls.items()}}))
    return rows


def _ladder(name: str, result: dict, width: int = 560, bar: int = 16) -> str:
    """One VQA benchmark's ladder as horizontal bars (accuracy 0-100), with the gap each mode closes."""
    first = result["mode"]
    rows = [(f"{rung} (language model)", scores["overall"], "#6a8caf") for rung, scores in result["ladder"].items()]
    rows += [(f"student, {mode}", scores["overall"], "#1f5fbf") for mode, scores in result["modes"].items()]
    rows += [(control.replace("_", " "), scores["overall"], "#b0b0b0")
             for control, scores in result["modes"][first]["controls"].items()]
    label, height = 190, bar + 6
    svg = [f"<svg width={width} height={height * len(rows) + 24} role=img aria-label='{html.escape(name)} ladder'>"]
    for k, (text, value, colour) in enumerate(rows):
        y, length = 4 + k * height, (width - label - 60) * max(0.0, min(value, 100.0)) / 100
        svg.append(f"<text x=4 y={y + bar - 4} font-size=12>{html.escape(text)}</text><rect x={label} y={y} "
                   f"width={length:.1f} height={bar} fill='{colour}'/><text x={label + length + 4:.1f} "
                   f"y={y + bar - 4} font-size=12>{value:.2f}</text>")
    axis_y = height * len(rows) + 8
    svg.append(f"<line x1={label} y1={axis_y} x2={width - 60} y2={axis_y} stroke='#999'/><text x={label} "
               f"y={axis_y + 13} font-size=10>0</text><text x={width - 75} y={axis_y + 13} font-size=10>100</text>"
               "</svg>")
    gaps = "; ".join(f"{mode}: " + ", ".join(f"{rung} {_share(gap['overall'])}"
                                             for rung, gap in scores["gap_closed"].items())
                     for mode, scores in result["modes"].items())
    return f"<h3>{html.escape(name)}</h3>{''.join(svg)}<p class=small>gap closed, {html.escape(gaps)}</p>"


def _share(value: float | None) -> str:
    return "no gap" if value is None else f"{value:.0%}"


def _row(name: str, metric: str, by_condition: dict) -> str:
    """A table row: one cell per CONDITIONS column, empty where a benchmark has no such condition."""
    cells = [by_condition.get(condition, "") for condition in CONDITIONS]
    shown = "".join(f"<td>{value:.3f}</td>" if isinstance(value, float) else f"<td>{value}</td>" for value in cells)
    return f"<tr><td class=l>{html.escape(name)}</td><td class=l>{html.escape(metric)}</td>{shown}</tr>"


def _retention(retention: dict) -> str:
    if "student_loss" not in retention:
        return f"<p>Text retention: {html.escape(str(retention.get('skipped', 'not measured')))}</p>"
    return (f"<h2>Text retention</h2><p>Infilling loss on {retention['documents']} held-out documents: language "
            f"model {retention['language_model_loss']:.4f}, student {retention['student_loss']:.4f} "
            f"(change {retention['loss_increase']:+.4f}); the student with the blank image's prefix in front, as it "
            f"was distilled, {_loss(retention.get('student_loss_blank_image'))}.</p>")


def _loss(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4f}"


def _vqa_cards(samples: list[dict]) -> str:
    cards = []
    for sample in samples:
        lines = []
        for q in sample["questions"]:
            image, blank = q["image"], q.get("blank", {})
            css = "good" if image["score"] >= 99.99 else "bad" if image["score"] == 0 else ""
            # most frequent first, ties in the annotators' order (a set's order changes from run to run)
            humans = ", ".join(sorted(dict.fromkeys(q["humans"]), key=q["humans"].count, reverse=True))
            others = "".join(f"{html.escape(mode)}: {html.escape(other['answer']) or '∅'} ({other['score']:.0f}); "
                             for mode, other in q.get("modes", {}).items())
            lines.append(f"<div><b>{html.escape(q['question'])}</b><br><span class={css}>"
                         f"{html.escape(image['answer']) or '∅'} ({image['score']:.0f})</span>"
                         f" <span class=small>{others}blank: {html.escape(blank.get('answer', '')) or '∅'}; humans: "
                         f"{html.escape(humans)}</span></div>")
        described = (f"<div class=small>described as: <i>{html.escape(sample['description'])}</i></div>"
                     if sample.get("description") is not None else "")
        cards.append(f"<div class=card>{_thumbnail(sample['path'])}<div class=small>image {sample['image_id']}"
                     f"</div>{described}{''.join(lines)}</div>")
    return "".join(cards)


def _caption_cards(samples: list[dict]) -> str:
    cards = []
    for sample in samples:
        result, blank = sample["image"], sample.get("blank", {})
        cider = f" (CIDEr {result['CIDEr']:.2f})" if result.get("CIDEr") is not None else ""
        references = "<br>".join(html.escape(r) for r in sample["references"])
        cards.append(f"<div class=card>{_thumbnail(sample['path'])}<b>{html.escape(result['caption']) or '∅'}</b>"
                     f"{cider}<br><span class=small>blank: {html.escape(blank.get('caption', '')) or '∅'}<br>"
                     f"references:<br>{references}</span></div>")
    return "".join(cards)


def _thumbnail(path: str) -> str:
    try:
        image = Image.open(path).convert("RGB")
    except (OSError, ValueError):
        return "<span class=small>(image not readable)</span>"
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f"<img width={THUMBNAIL} src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _curves(folder: Path) -> str:
    """Each dvclive series of the distillation as a small SVG line chart."""
    series = sorted((folder / "plots" / "metrics").rglob("*.tsv")) if folder.is_dir() else []
    if not series:
        return f"<h2>Training curves</h2><p class=small>no dvclive curves in {html.escape(str(folder))}</p>"
    charts = "".join(_chart(path.relative_to(folder / "plots" / "metrics").with_suffix("").as_posix(), path)
                     for path in series)
    return f"<h2>Training curves</h2><div>{charts}</div>"


def _chart(name: str, path: Path, width: int = 300, height: int = 150) -> str:
    with path.open() as file:
        rows = [(float(r["step"]), float(r[Path(name).name])) for r in csv.DictReader(file, delimiter="\t")]
    if not rows:
        return ""
    steps, values = zip(*rows, strict=True)
    low, high, first = min(values), max(values), min(steps)
    span_x, span_y = (max(steps) - first) or 1, (high - low) or 1
    points = " ".join(f"{10 + (s - first) / span_x * (width - 20):.1f},"
                      f"{height - 20 - (v - low) / span_y * (height - 40):.1f}" for s, v in rows)
    return (f"<svg width={width} height={height}><text x=10 y=14 font-size=12>{html.escape(name)} "
            f"({values[0]:.3g} → {values[-1]:.3g})</text><polyline fill=none stroke='#1f5fbf' "
            f"stroke-width=1.5 points='{points}'/><text x=10 y={height - 5} font-size=10>min {low:.3g}, max "
            f"{high:.3g}, {len(rows)} steps</text></svg>")


# -- the samples the report shows: the same images under every condition, drawn with evaluate.seed ---------
def vqa_samples(spec, records, annotations, predictions, results, params) -> list[dict]:
    """A seeded sample of images with their questions, answers under each condition, humans and scores."""
    humans = {a["question_id"]: [h["answer"] for h in a["answers"]] for a in annotations["annotations"]}
    answers = {c: {p["question_id"]: p["answer"] for p in preds} for c, preds in predictions.items()}
    by_image: dict[int, list] = {}
    for record in records:
        by_image.setdefault(record["image_id"], []).append(record)
    chosen = _sample(sorted(by_image), params.report_samples, params.seed)
    return [{"path": str(spec.images / spec.image_pattern.format(image_id=image_id)), "image_id": image_id,
             "questions": [{"question_id": r["question_id"], "question": r["question"],
                            "humans": humans.get(r["question_id"], []),
                            **{c: {"answer": answers[c][r["question_id"]],
                                   "score": results[c]["perQuestion"][r["question_id"]]} for c in answers}}
                           for r in by_image[image_id]]}
            for image_id in chosen]


def caption_samples(spec, annotations, predictions, results, params) -> list[dict]:
    references: dict[int, list[str]] = {}
    for a in annotations["annotations"]:
        references.setdefault(a["image_id"], []).append(a["caption"])
    captions = {c: {p["image_id"]: p["caption"] for p in preds} for c, preds in predictions.items()}
    chosen = _sample(sorted(references), params.report_samples, params.seed)
    return [{"path": str(spec.images / spec.image_pattern.format(image_id=image_id)), "image_id": image_id,
             "references": references[image_id][:3],
             **{c: {"caption": captions[c].get(image_id, ""),
                    "CIDEr": results[c]["perImage"].get(image_id, {}).get("CIDEr")} for c in captions}}
            for image_id in chosen]


def _sample(ids: list[int], count: int, seed: int) -> list[int]:
    if count >= len(ids):
        return ids
    return sorted(np.random.default_rng(seed).choice(ids, size=count, replace=False).tolist())
