"""`vlkd package`: the student, its teacher and its language model as one folder, with a model card.

`data/model/` (package.output) holds
  student/         the distilled student (BART, projections, vlkd-student.json)
  teacher/         the teacher that embeds its images: an open_clip tag's manifest, or the checkpoint
  plm/             the language model before distillation, which describe mode answers with
  vlkd-model.json  how the evaluation asked the student (prompts, beams, modes), its identity (weights
                   hash, teacher fingerprint, language model), the lineage and the scorecard
  README.md        the model card, in Hugging Face's format

Files are hard links where the file system allows (a package of ViT-L-14 and bart-large costs no disk),
copies otherwise. `vlkd.load_model(package.output)` and `vlkd predict` load it; a rerun whose record
matches is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from vlkd.config import PackageParams
from vlkd.errors import VlkdError
from vlkd.inference.asking import Asking
from vlkd.inference.identity import MODEL_RECORD, student_sha256
from vlkd.io import building_folder, project_relative, sha256_file, write_json_atomic
from vlkd.models.student import STUDENT_CONFIG
from vlkd.models.teacher import MANIFEST as TEACHER_MANIFEST
from vlkd.models.teacher import SOURCE_TAG, check_teacher, load_teacher, resolve_teacher
from vlkd.package.card import model_card
from vlkd.record import RECORD, StageRecord

log = logging.getLogger(__name__)

CARD = "README.md"
PACKAGED_CHECKPOINT = "checkpoint file packaged with the model"  # resolved beside the manifest


def package(params: PackageParams) -> dict:
    """Write the model folder; returns vlkd-model.json's content."""
    record = StageRecord.of("package", __name__, params, stage_inputs(params), params.output / MODEL_RECORD)
    if record.reusable(params.output):
        log.info("the model in %s is up to date with its record; skipped", params.output)
        return json.loads((params.output / MODEL_RECORD).read_text())
    student = json.loads((params.student / STUDENT_CONFIG).read_text())
    teacher = json.loads((params.teacher / TEACHER_MANIFEST).read_text())
    # Loaded (on the CPU) to check it is the student's teacher as evaluate checks it: by its weights' hash.
    fingerprint = load_teacher(*resolve_teacher(params.teacher),
                               token_grid=student["teacher"].get("token_grid")).fingerprint.as_dict()
    check_teacher(student["teacher"], fingerprint, where=f"{params.teacher}")
    evaluation = _read_json(params.evaluation / "metrics.json", "vlkd evaluate")
    asked = _read_json(params.evaluation / RECORD, "vlkd evaluate")["params"]
    with building_folder(params.output, MODEL_RECORD, "model", "package.output") as building:
        _link_tree(params.student, building / "student", skip={RECORD})
        _package_teacher(params.teacher, teacher, building / "teacher")
        _link_tree(params.plm, building / "plm", skip={RECORD})
        model = {
            "format": 1,
            "asking": Asking.of(asked, where=str(params.evaluation / RECORD)).as_dict(),
            "vqa_modes": asked["vqa_modes"],
            "identity": {"student_sha256": student_sha256(params.student), "teacher": student["teacher"],
                         "plm": student["plm"]},
            "lineage": _lineage(params),
            "distill": _read_json(params.student / RECORD, "vlkd distill")["params"],
            "scorecard": evaluation,
        }
        model = project_relative(model, params.output)  # the same bytes wherever the project lies
        write_json_atomic(building / MODEL_RECORD, model)
        described = project_relative({**fingerprint, "source": teacher["source"], "pretrained": teacher["pretrained"]},
                                     params.output)
        (building / CARD).write_text(model_card(model, described))
        record.write(building)
    log.info("model packaged in %s (student %s)", params.output, model["identity"]["student_sha256"][:12])
    return model


def package_metrics(folder: Path) -> dict:
    """What the package holds: files and bytes per part (hard links count as the bytes they name)."""
    parts = {}
    for part in ("student", "teacher", "plm"):
        files = [path for path in (folder / part).rglob("*") if path.is_file()]
        parts[part] = {"files": len(files), "bytes": sum(path.stat().st_size for path in files)}
    return {"parts": parts, "bytes": sum(part["bytes"] for part in parts.values())}


def _package_teacher(folder: Path, manifest: dict, target: Path) -> None:
    """A pretrained tag needs its manifest only (open_clip fetches or caches the weights); a trained or a
    user's checkpoint travels with the model, and the manifest then names it beside itself."""
    target.mkdir(parents=True)
    if manifest["source"] == SOURCE_TAG:
        write_json_atomic(target / TEACHER_MANIFEST, manifest)
        return
    _link_tree(folder, target, skip={RECORD, TEACHER_MANIFEST})
    checkpoint = Path(resolve_teacher(folder)[1])
    if not (target / checkpoint.name).exists():
        _link(checkpoint, target / checkpoint.name)
    write_json_atomic(target / TEACHER_MANIFEST, {**manifest, "pretrained": checkpoint.name,
                                                   "source": PACKAGED_CHECKPOINT})


def _lineage(params: PackageParams) -> dict:
    """Where the model's data came from: the URL list's hash, the shards' and rows' counts, what the
    filter kept and dropped by reason, and which feature rows distillation read."""
    if not params.url_list.is_file():
        raise VlkdError(f"{params.url_list} does not exist; set package.url_list to the download's URL list")
    download = _read_json(params.shards / "summary.json", "vlkd download")
    lineage = {"url_list": {"path": params.url_list.as_posix(), "sha256": sha256_file(params.url_list)},
               "shards": download.get("shards", {}), "url_rows": download.get("url_list", {}).get("rows")}
    if _filtered(params):
        summary = _read_json(params.filter / "summary.json", "vlkd filter")
        lineage["filter"] = {key: summary.get(key) for key in ("rows", "kept", "dropped", "clip_score")}
    run = _read_json(params.student / "distill-metrics.json", "vlkd distill")  # the run that made this student
    trained = run.get("trained_rows", {})
    lineage["distilled"] = {"steps": run.get("steps"), "epochs": run.get("epochs"),
                            "feature_rows": run.get("feature_rows"),
                            # every row ({"all": n}), or the selected ones ({"new", "replayed"})
                            "trained_rows": trained.get("all", trained.get("new", 0) + trained.get("replayed", 0)),
                            "continued_from_a_student": run.get("init") is not None}
    return lineage


def _filtered(params: PackageParams) -> bool:
    """Whether the student trained on the filter's kept rows (its distill params name them) or on every row."""
    return _read_json(params.student / RECORD, "vlkd distill")["params"].get("kept") is not None


def _read_json(path: Path, command: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise VlkdError(f"{path} does not exist; run `{command}` first, or check the package section of "
                        "params.yaml") from None
    except ValueError as err:
        raise VlkdError(f"{path} is not JSON ({err}); run `{command}` again") from err


def _link_tree(source: Path, target: Path, skip: set[str] = frozenset()) -> None:
    if not source.is_dir():
        raise VlkdError(f"{source} is not a folder; check the package section of params.yaml")
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_file() and relative.as_posix() not in skip:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            _link(path, target / relative)


def _link(source: Path, target: Path) -> None:
    """A hard link (no copy of a multi-gigabyte model), or a copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def stage_inputs(params: PackageParams) -> dict:
    """What the package reads: the three model folders, the scorecard, the lineage's files."""
    inputs: dict = {"student": params.student, "teacher": params.teacher, "plm": params.plm,
                    "evaluation": params.evaluation, "url_list": params.url_list,
                    "shards_summary": params.shards / "summary.json"}
    if _filtered(params):
        inputs["filter_summary"] = params.filter / "summary.json"
    for name, path in inputs.items():
        if not Path(path).exists():
            raise VlkdError(f"{path} does not exist (package.{name.split('_')[0]}); run the stages before "
                            "`vlkd package`, or check the package section of params.yaml")
    return inputs
