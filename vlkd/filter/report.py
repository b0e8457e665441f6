"""The filter's page (report.html in its folder): what was dropped and why, the CLIP-score histogram with
the threshold drawn on it, and a seeded sample of rejected pairs with their images, captions and scores."""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from vlkd.config.filter import FilterParams
from vlkd.data.feature_schema import read_metadata
from vlkd.data.kept_rows import REASONS, rejects_path
from vlkd.data.webdataset import UnreadableShard, iter_shard, warn_unreadable
from vlkd.filter.summary import score_histogram

THUMBNAIL = 96
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ddd;border-radius:6px;padding:8px;width:360px}
.card img{float:left;margin-right:8px}.small{font-size:85%;color:#555}svg{border:1px solid #ddd}
"""


def write_report(path: Path, output: Path, summary: dict, params: FilterParams) -> None:
    files = sorted(p.name for p in (output / "rejects").glob("*.parquet"))
    parts = [f"<!doctype html><meta charset=utf-8><title>vlkd filter</title><style>{_STYLE}</style>",
             "<h1>vlkd: corpus filter</h1>",
             f"<p>{summary['kept']:,} of {summary['rows']:,} rows kept ({100 * summary['kept_share']:.1f}%) "
             f"in {summary['files']} feature file(s).</p>",
             _counts(summary), "<h2>CLIP score</h2>", _histogram_svg(score_histogram(output, files), summary),
             "<h2>Rejected pairs (a sample)</h2>", f"<div class=cards>{_cards(output, files, params)}</div>"]
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def _counts(summary: dict) -> str:
    rows = "".join(f"<tr><td class=l>{reason.replace('_', ' ')}</td><td>{count:,}</td>"
                   f"<td>{100 * count / max(summary['rows'], 1):.2f}%</td></tr>"
                   for reason, count in summary["dropped"].items())
    return (f"<table><tr><th class=l>dropped because</th><th>rows</th><th>share</th></tr>{rows}"
            f"<tr><th class=l>kept</th><th>{summary['kept']:,}</th><th>{100 * summary['kept_share']:.2f}%</th></tr>"
            "</table>")


def _histogram_svg(histogram: dict, summary: dict, width: int = 640, height: int = 220) -> str:
    edges = histogram["edges"]
    if not edges:
        return "<p class=small>no scores</p>"
    kept, dropped = np.array(histogram["kept"]), np.array(histogram["dropped"])
    top = max(int((kept + dropped).max()), 1)
    low, high = edges[0], edges[-1]
    bar = (width - 40) / len(kept)
    shapes = []
    for i, (k, d) in enumerate(zip(kept, dropped, strict=True)):
        x = 30 + i * bar
        for value, base, colour in ((k, 0, "#4a7fb5"), (d, k, "#d08a3a")):
            if value:
                y = height - 25 - (base + value) / top * (height - 40)
                shapes.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar - 1:.1f}" '
                              f'height="{value / top * (height - 40):.1f}" fill="{colour}"/>')
    threshold = summary["clip_score"]["threshold"]
    if threshold is not None and low <= threshold <= high:
        x = 30 + (threshold - low) / (high - low) * (width - 40)
        # the label on the side of the line with room for it
        anchor, label_x = ("end", x - 4) if x > width / 2 else ("start", x + 4)
        shapes.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="10" y2="{height - 25}" stroke="#a31515" '
                      f'stroke-width="2"/><text x="{label_x:.1f}" y="22" font-size="12" fill="#a31515" '
                      f'text-anchor="{anchor}">threshold {threshold:.3f} ({summary["clip_score"]["rule"]})</text>')
    shapes.append(f'<text x="30" y="{height - 8}" font-size="12">{low:.2f}</text>'
                  f'<text x="{width - 50}" y="{height - 8}" font-size="12">{high:.2f}</text>')
    legend = ('<p class=small><span style="color:#4a7fb5">&#9632;</span> kept '
              '<span style="color:#d08a3a">&#9632;</span> dropped (by any rule)</p>')
    return f'<svg width="{width}" height="{height}">{"".join(shapes)}</svg>{legend}'


def _cards(output: Path, files: list[str], params: FilterParams) -> str:
    sample = _sample_rejects(output, files, params)
    images = _thumbnails(sample, params)
    cards = []
    for name, row in sample:
        score = "" if row["clip_score"] is None or np.isnan(row["clip_score"]) else f"CLIP {row['clip_score']:.3f}"
        duplicate = (f"<br>duplicate of {html.escape(row['duplicate_of'])} (cos {row['similarity']:.3f})"
                     if row["duplicate_of"] else "")
        image = images.get((name, row["key"]))
        picture = f'<img src="data:image/png;base64,{image}">' if image else ""
        cards.append(f"<div class=card>{picture}<b>{row['reason'].replace('_', ' ')}</b> {score}<br>"
                     f"{html.escape(row['caption'] or '')}<br><span class=small>{name} {html.escape(row['key'])}"
                     f"{duplicate}</span></div>")
    return "".join(cards) or "<p class=small>nothing was dropped</p>"


def _sample_rejects(output: Path, files: list[str], params: FilterParams) -> list[tuple[str, dict]]:
    """Up to rejects_sample rejected rows, the reasons taken in turn so a rare reason is shown too. Reads
    the reason column of every file and only the chosen rows whole (a corpus can reject millions)."""
    by_reason: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name in files:
        reasons = pq.read_table(rejects_path(output, name), columns=["reason"]).column("reason").to_pylist()
        for index, reason in enumerate(reasons):
            by_reason[reason].append((name, index))
    rng = np.random.default_rng(params.seed)
    pools = {reason: [by_reason[reason][i] for i in rng.permutation(len(by_reason[reason]))]
             for reason in REASONS if by_reason.get(reason)}
    chosen: list[tuple[str, int]] = []
    while len(chosen) < params.rejects_sample and any(pools.values()):
        for pool in pools.values():
            if pool and len(chosen) < params.rejects_sample:
                chosen.append(pool.pop())
    rows = {}
    for name in sorted({name for name, _ in chosen}):
        indices = [index for file, index in chosen if file == name]
        table = pq.read_table(rejects_path(output, name)).take(indices)
        rows.update({(name, index): row for index, row in zip(indices, table.to_pylist(), strict=True)})
    return [(name, rows[(name, index)]) for name, index in chosen]


def _thumbnails(sample: list[tuple[str, dict]], params: FilterParams) -> dict[tuple[str, str], str]:
    wanted: dict[str, set[str]] = defaultdict(set)
    for name, row in sample:
        wanted[name].add(row["key"])
    found = {}
    for name, keys in wanted.items():
        shard = (read_metadata(Path(params.features) / name) or {}).get("shard")
        tar = Path(params.shards) / shard if shard else None
        if tar is None or not tar.is_file():
            continue
        try:
            for sample_ in iter_shard(tar):
                if sample_.key in keys and sample_.image:
                    found[(name, sample_.key)] = _png(sample_.image)
                    keys.discard(sample_.key)
                    if not keys:  # stop reading the shard: a refresh rewrites this report every time
                        break
        except UnreadableShard as err:  # the report shows those rows without their images
            warn_unreadable(err)
    return found


def _png(data: bytes) -> str | None:
    try:
        image = Image.open(io.BytesIO(data)).convert("RGB")
    except OSError:
        return None
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
