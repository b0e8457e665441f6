"""The student a distillation run starts from: a new one on the language model, with projections sized
by the feature files, or the student it continues (checked against the features' teacher), and the
feature columns its objectives read."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from vlkd.config import DistillParams
from vlkd.data.feature_store import FeatureStore
from vlkd.errors import VlkdError
from vlkd.models.language_model import MANIFEST as PLM_MANIFEST
from vlkd.models.language_model import read_manifest
from vlkd.models.student import STUDENT_CONFIG, Student, StudentConfig
from vlkd.models.teacher import check_teacher

logger = logging.getLogger(__name__)


def needed_columns(params: DistillParams, store: FeatureStore) -> list[str]:
    names = set(pq.read_schema(store.files[0]).names)
    needed = {"image_embedding"}
    if params.ttdm_weight or params.aligned_teacher:
        if "text_embedding" not in names:
            raise VlkdError(f"{store.files[0]} has no text_embedding column, which TTDM and aligned_teacher need; "
                            "re-extract the features or set distill.ttdm_weight: 0 and aligned_teacher: false")
        needed.add("text_embedding")
    if (params.icti_weight or params.reading_weight) and "captions" in names:
        needed.add("captions")
    if params.prefix == "patch":
        if "image_tokens" not in names:
            raise VlkdError(f"{store.files[0]} has no image_tokens column, which the patch prefix needs; set "
                            "features.image_tokens: true and re-extract, or use distill.prefix: pooled")
        needed.add("image_tokens")
    return sorted(needed)


def build_student(params: DistillParams, store: FeatureStore, init: Path | None) -> Student:
    if init is not None:
        student = Student.from_pretrained(init)
        try:
            check_teacher(student.config.teacher, store.teacher, where=str(store.files[0].parent))
        except VlkdError as err:  # after a change of teacher, the usual way out is a new student
            raise VlkdError(f"{err}; or, for a new student of this teacher, empty distill.init {init} (keep its "
                            "README.md) or set distill.init: null") from err
        if student.config.aligned_teacher != params.aligned_teacher:
            raise VlkdError(f"the student in {init} was distilled with aligned_teacher "
                            f"{student.config.aligned_teacher}, not {params.aligned_teacher}; drop distill.init")
        if student.config.text_positions != params.text_positions:
            raise VlkdError(f"the student in {init} reads its text {student.config.text_positions}, not distill."
                            f"text_positions {params.text_positions}; set it to match or drop distill.init")
        if student.config.prefix != params.prefix:
            raise VlkdError(f"the student in {init} has a {student.config.prefix} prefix, not "
                            f"distill.prefix {params.prefix}; set distill.prefix to match or drop distill.init")
        return student
    visual_width = store.embed_dim
    if params.prefix == "patch":
        visual_width = pq.read_schema(store.files[0]).field("image_tokens").type.value_type.list_size
    config = StudentConfig(teacher=store.teacher, embed_dim=store.embed_dim, prefix=params.prefix,
                           prefix_tokens=params.prefix_tokens, visual_width=visual_width,
                           itcl_temperature=params.itcl_temperature, plm=plm_manifest(params.plm),
                           aligned_teacher=params.aligned_teacher, text_positions=params.text_positions)
    student = Student.from_language_model(params.plm, config)
    student.logit_scale.requires_grad_(params.itcl_learnable_temperature)
    return student


def init_folder(init: Path | None) -> Path | None:
    """The student to continue from. A folder with nothing in it but a README (the pipeline's
    data/promoted before a refresh has put the promoted student there) means a fresh student."""
    if init is None:
        return None
    if not init.is_dir():
        raise VlkdError(f"distill.init {init} is not a folder; point it at a student folder (one `vlkd distill` "
                        "wrote) or set it to null for a fresh student")
    if (init / STUDENT_CONFIG).is_file():
        return init
    if all(path.name == "README.md" for path in init.iterdir()):
        logger.info("distill.init %s holds no student: a fresh student from the language model", init)
        return None
    raise VlkdError(f"distill.init {init} has no {STUDENT_CONFIG}; point it at a student folder or empty it "
                    "for a fresh student")


def plm_manifest(folder: Path) -> dict:
    """What the student records of its language model: the manifest's identity, or the folder of a BART
    that was not made by `vlkd plm`."""
    if not (folder / PLM_MANIFEST).is_file():
        return {"source": str(folder)}
    record = read_manifest(folder)
    return {key: record[key] for key in ("name", "source", "sha256") if key in record}
