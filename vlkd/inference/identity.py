"""A packaged model's record file and the student's identity: the hash of its weights, which every prediction
carries so that predictions of different models never pass for one another."""

from __future__ import annotations

from pathlib import Path

from vlkd.record import files_sha256, fingerprint

MODEL_RECORD = "vlkd-model.json"  # what `vlkd package` writes beside the model's parts
WEIGHTS = ("model.safetensors", "projections.safetensors")  # the student's BART and its projections


def student_sha256(student: Path) -> str:
    """One hash of the student's weights (BART and the projections)."""
    paths = [student / name for name in WEIGHTS]
    return fingerprint(dict(zip(WEIGHTS, files_sha256(paths), strict=True)))
