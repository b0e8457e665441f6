"""The model card (README.md in Hugging Face's format: YAML metadata, then Markdown) of a packaged model:
what it was distilled from, the data's lineage, the distillation's params and the scorecard with the
controls each score is to be read against."""

from __future__ import annotations

import yaml

VQA_CONTROLS = ("blank", "shuffled", "text_only", "prior")


def model_card(model: dict, teacher: dict) -> str:
    identity, lineage = model["identity"], model["lineage"]
    plm = identity["plm"]
    metadata = {"library_name": "vlkd", "tags": ["vision-language", "knowledge-distillation", "clip", "bart", "vqa",
                                                 "image-captioning"],
                "pipeline_tag": "visual-question-answering", "base_model": plm.get("name")}
    sections = [
        "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n",
        f"# VLKD student {identity['student_sha256'][:12]}\n",
        f"A BART language model ({plm.get('name')}) distilled from the CLIP model {teacher['model']} with VLKD's "
        "objectives, packaged by vlkd. It answers questions about images and captions them zero-shot.\n",
        _use(model),
        _distilled_from(identity, teacher),
        _lineage(lineage),
        _scorecard(model["scorecard"], model["vqa_modes"]),
        "## Distillation params\n\n```yaml\n" + yaml.safe_dump(model["distill"], sort_keys=True) + "```\n",
        "## How it is asked\n\n```yaml\n" + yaml.safe_dump(model["asking"], sort_keys=True) + "```\n",
    ]
    return "\n".join(sections)


def _use(model: dict) -> str:
    return ("## Use\n\n```python\nfrom vlkd import load_model\n\nmodel = load_model(\"data/model\")  # this folder\n"
            "model.answer([\"photo.jpg\"], [\"What color is the car?\"])\nmodel.caption([\"photo.jpg\"])\n```\n\n"
            "or `vlkd predict FOLDER --model data/model --question \"...\" --output answers.parquet`. VQA is asked "
            f"in `{model['vqa_modes'][0]}` mode by default, as the scorecard's headline.\n")


def _distilled_from(identity: dict, teacher: dict) -> str:
    plm = identity["plm"]
    weights = ", ".join(f"{name} {digest[:12]}" for name, digest in (plm.get("sha256") or {}).items())
    return ("## Distilled from\n\n"
            f"- teacher: `{teacher['model']}`, weights sha256 `{teacher['weights_sha256'][:16]}`, "
            f"{teacher.get('source', '')} `{teacher.get('pretrained')}`, open_clip {teacher.get('open_clip_version')}\n"
            f"- language model: `{plm.get('name')}` ({plm.get('source', '')}; {weights})\n"
            f"- student weights sha256: `{identity['student_sha256']}` (every prediction carries it)\n")


def _lineage(lineage: dict) -> str:
    lines = ["## Data lineage\n",
             f"- URL list: `{lineage['url_list']['path']}`, sha256 `{lineage['url_list']['sha256'][:16]}`, "
             f"{lineage.get('url_rows')} rows",
             f"- downloaded: {lineage['shards'].get('samples')} images in {lineage['shards'].get('count')} shards"]
    if "filter" in lineage:
        kept = lineage["filter"]
        dropped = ", ".join(f"{reason} {count}" for reason, count in (kept.get("dropped") or {}).items() if count)
        lines.append(f"- filtered: {kept.get('kept')} of {kept.get('rows')} rows kept (dropped: {dropped or 'none'})")
    else:
        lines.append("- not filtered: distillation read every row")
    run = lineage["distilled"]
    continued = ", continuing a promoted student" if run["continued_from_a_student"] else ""
    lines.append(f"- distilled for {run['steps']} steps ({run['epochs']} epochs) on {run['trained_rows']} of the "
                 f"{run['feature_rows']} feature rows{continued}")
    return "\n".join(lines) + "\n"


def _scorecard(scorecard: dict, modes: list[str]) -> str:
    """Each benchmark's score with the image and under each control: a score is read against what the
    question alone, a blank image or another image already get."""
    lines = ["## Scorecard\n", "Zero-shot, with the controls each score is to be read against (vlkd evaluate).\n"]
    if scorecard.get("recipe"):
        extensions = scorecard["recipe"].get("extensions")
        lines.append(f"Student: {scorecard['recipe']['name']}"
                     + (f" (not in the paper: {', '.join(extensions)})" if extensions else "") + ".\n")
    vqa = {name: m for name, m in scorecard.items() if isinstance(m, dict) and "perAnswerType" in m}
    if vqa:
        lines += ["| benchmark | mode | with the image | " + " | ".join(VQA_CONTROLS) + " |",
                  "|---|---|---|" + "---|" * len(VQA_CONTROLS)]
        for name, metrics in vqa.items():
            for mode in modes:
                scores = metrics.get("modes", {}).get(mode)
                if scores:
                    controls = " | ".join(_number(scores["controls"].get(c, {}).get("overall")) for c in VQA_CONTROLS)
                    lines.append(f"| {name} | {mode} | {_number(scores['overall'])} | {controls} |")
        lines.append("\nVQA accuracy (official metric, %).\n")
    captions = {name: m for name, m in scorecard.items() if isinstance(m, dict) and "CIDEr" in m}
    if captions:
        lines += ["| benchmark | CIDEr with the image | blank | text only |", "|---|---|---|---|"]
        for name, metrics in captions.items():
            controls = metrics.get("controls", {})
            lines.append(f"| {name} | {_number(metrics['CIDEr'], 3)} | "
                         f"{_number(controls.get('blank', {}).get('CIDEr'), 3)} | "
                         f"{_number(controls.get('text_only', {}).get('CIDEr'), 3)} |")
    retention = scorecard.get("retention", {})
    if "student_loss" in retention:
        lines.append(f"\nText retention: infilling loss {retention['language_model_loss']:.3f} before distillation, "
                     f"{retention['student_loss']:.3f} after.")
    return "\n".join(lines) + "\n"


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
