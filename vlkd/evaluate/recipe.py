"""What recipe made a student, in the paper's terms, so that every scorecard says whether it measures VLKD as
published or VLKD with additions: the objectives it was distilled with, and each departure from the paper by
name. Read from the distill stage's record in the student folder (its params)."""

from __future__ import annotations

from pathlib import Path

from vlkd.data.vqa_metric import read_json
from vlkd.record import RECORD

OBJECTIVES = (("TTDM", "ttdm_weight"), ("ITCL", "itcl_weight"), ("ICTI", "icti_weight"))
# Not in the paper (docs/method.md): each is a switch in `distill`, named here as the README and the report name it.
EXTENSIONS = (
    ("pseudo-QA", lambda p: (p.get("reading_weight") or 0) > 0),              # caption reading
    ("retention", lambda p: (p.get("retention_weight") or 0) > 0),            # the language model's own infilling
    ("patch prefix", lambda p: p.get("prefix") == "patch"),                   # the teacher's image tokens
    ("whole-caption masking", lambda p: (p.get("whole_caption_share") or 0) > 0),
    ("aligned teacher (a diagnostic)", lambda p: bool(p.get("aligned_teacher"))),
)


def recipe(params: dict) -> dict:
    """{"name", "objectives", "extensions"} of a student distilled with these distill params: "VLKD (the paper's
    recipe)" for TTDM + ITCL + ICTI and nothing else; otherwise e.g. "VLKD + pseudo-QA + retention" or "VLKD
    without TTDM"."""
    objectives = [name for name, key in OBJECTIVES if (params.get(key, 1.0) or 0) > 0]
    extensions = [name for name, applies in EXTENSIONS if applies(params)]
    missing = [name for name, _ in OBJECTIVES if name not in objectives]
    name = "VLKD" + (f" without {' and '.join(missing)}" if missing else "")
    name += "".join(f" + {extension}" for extension in extensions)
    if not missing and not extensions:
        name += " (the paper's recipe)"
    return {"name": name, "objectives": objectives, "extensions": extensions}


def student_recipe(student: Path) -> dict:
    """The recipe of the student in `student`, from its distill record; a student without one (made before
    records, or by hand) is named as unknown."""
    record = Path(student) / RECORD
    params = read_json(record).get("params") if record.is_file() else None
    if not isinstance(params, dict):
        return {"name": "unknown (the student folder has no record of its distillation)", "objectives": [],
                "extensions": []}
    return recipe(params)
