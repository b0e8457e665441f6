"""`load_model`: a distilled student together with the teacher that embeds its images and the language model
that describe mode answers with, ready to answer questions about images and to caption them.

A packaged model (`vlkd package`: `data/model/`) holds all three, how the evaluation asked the student,
and the model card; `load_model` also takes a bare student folder with `teacher=` and `plm=`. Images are
embedded through the features stage's code (`vlkd.data.image_features`) and answered through evaluate's
(`vlkd.inference.answering`), so an image and a question get the answer the scorecard counted.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vlkd.data.image_features import embed_images
from vlkd.errors import VlkdError
from vlkd.inference.answering import FeatureRows, Generator, described_answers
from vlkd.inference.asking import Asking
from vlkd.inference.identity import MODEL_RECORD, student_sha256
from vlkd.models.infill import fill_prompt
from vlkd.models.student import STUDENT_CONFIG, Student, load_language_model
from vlkd.models.teacher import Teacher, check_teacher, load_teacher, resolve_teacher
from vlkd.training import autocast, resolve_device, resolve_precision

log = logging.getLogger(__name__)

ImageLike = Image.Image | str | Path
MODES = ("direct", "describe")


def load_model(folder: str | Path, device: str = "auto", precision: str = "auto", teacher: str | Path | None = None,
               plm: str | Path | None = None, asking: Asking | None = None) -> VlkdModel:
    """The model in `folder`: a packaged model (`vlkd package`), or a student folder with `teacher=` (the
    teacher folder it was distilled from), `asking=` (the evaluation's prompts and decoding) and, for
    describe mode, `plm=` (the language model before distillation). `device`: auto | cpu | cuda;
    `precision`: auto (bf16 on CUDA, fp32 on the CPU) | fp32 | bf16 | fp16."""
    folder = Path(folder)
    record = _read_record(folder)
    if record is not None:
        student_dir, teacher_dir = folder / "student", Path(teacher) if teacher else folder / "teacher"
        plm_dir = Path(plm) if plm else (folder / "plm" if (folder / "plm").is_dir() else None)
        asking = asking or Asking.of(record["asking"], where=str(folder / MODEL_RECORD))
        modes, identity = record["vqa_modes"], record["identity"]
    elif (folder / STUDENT_CONFIG).is_file():
        if teacher is None:
            raise VlkdError(f"{folder} is a student without its teacher; pass teacher= (the teacher folder it was "
                            "distilled from), or load the packaged model that `vlkd package` writes (data/model)")
        student_dir, teacher_dir, plm_dir = folder, Path(teacher), Path(plm) if plm else None
        if asking is None:
            raise VlkdError(f"{folder} is a student folder, which does not record how the evaluation asked it; pass "
                            "asking=Asking.of(load_params('params.yaml').evaluate), or load the packaged model")
        modes, identity = list(MODES), None
    else:
        raise VlkdError(f"{folder} is not a vlkd model (no {MODEL_RECORD} or {STUDENT_CONFIG}); give the folder "
                        "`vlkd package` wrote (data/model) or a student folder (data/student)")
    torch_device = resolve_device(device, "device")
    student = Student.from_pretrained(student_dir, torch_device)
    clip = load_teacher(*resolve_teacher(teacher_dir), device=torch_device,
                        image_tokens=student.config.prefix == "patch",
                        token_grid=student.config.teacher.get("token_grid"))
    check_teacher(student.config.teacher, clip.fingerprint.as_dict(), where=f"the teacher {teacher_dir}")
    language_model = None
    if plm_dir is not None:
        bart, tokenizer = load_language_model(plm_dir, "plm")
        language_model = (bart.to(torch_device).eval(), tokenizer)
    identity = identity or {"student_sha256": student_sha256(student_dir), "teacher": clip.fingerprint.as_dict(),
                            "plm": student.config.plm}
    return VlkdModel(student, clip, language_model, asking, modes, identity, torch_device,
                     resolve_precision(precision, torch_device))


def _read_record(folder: Path) -> dict | None:
    path = folder / MODEL_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        missing = [key for key in ("asking", "vqa_modes", "identity") if key not in record]
    except (OSError, ValueError) as err:
        raise VlkdError(f"{path} is not a vlkd model record ({err}); run `vlkd package` again") from err
    if missing:
        raise VlkdError(f"{path} lacks {', '.join(missing)}; run `vlkd package` again")
    return record


@dataclass
class VlkdModel:
    """A student ready to use: `answer`, `caption`, and the identity its predictions carry."""

    student: Student
    teacher: Teacher
    language_model: tuple | None  # (BART, tokenizer) before distillation: describe mode's reader
    asking: Asking
    modes: list[str]  # the evaluation's VQA modes, the headline first
    identity: dict  # student_sha256, teacher (fingerprint), plm (manifest)
    device: torch.device
    precision: str

    @property
    def default_mode(self) -> str:
        return self.modes[0]

    def answer(self, images: Sequence[ImageLike], questions: Sequence[str], mode: str | None = None
               ) -> list[str | None]:
        """Each image's answer to its question (None where the image cannot be decoded), asked as the
        evaluation asked: `direct` (the student answers) or `describe` (the student describes, the language
        model answers); None: the evaluation's headline mode."""
        if len(images) != len(questions):
            raise VlkdError(f"{len(images)} image(s) but {len(questions)} question(s); give one question per image")
        features, _ = self.embed(images)
        return self.answer_features(features, list(questions), mode)

    def caption(self, images: Sequence[ImageLike]) -> list[str | None]:
        """Each image's caption (None where the image cannot be decoded)."""
        features, _ = self.embed(images)
        return self.caption_features(features)

    # -- the steps, for batch prediction over features it embedded itself -------------------------------
    def embed(self, images: Sequence[ImageLike | bytes], folder: Path | None = None
              ) -> tuple[list[torch.Tensor | None], dict[int, str]]:
        """The teacher's features of each image (None: not decodable) and {position: why not}. `folder`
        keeps the packed images and their features (a fresh temporary folder by default)."""
        sources = [_image_source(image) for image in images]
        key_of: dict = {}  # a file given twice is embedded once and shares its row, as in the evaluation
        for source in sources:
            key_of.setdefault(source if isinstance(source, Path) else id(source), f"{len(key_of):08d}")
        keys = [key_of[source if isinstance(source, Path) else id(source)] for source in sources]
        unique = dict(zip(keys, sources, strict=True))
        with tempfile.TemporaryDirectory(prefix="vlkd-embed-") as scratch:
            by_key, _, undecodable = embed_images(unique, self.teacher, folder or Path(scratch),
                                                  self.student.config.prefix == "patch", str(self.device),
                                                  precision=self.precision, batch_size=self.asking.batch_size)
        return ([by_key.get(key) for key in keys],
                {position: undecodable[key] for position, key in enumerate(keys) if key in undecodable})

    def answer_features(self, features: Sequence[torch.Tensor | None], questions: list[str],
                        mode: str | None = None) -> list[str | None]:
        mode = mode or self.default_mode
        if mode not in MODES:
            raise VlkdError(f"unknown VQA mode {mode!r}; use direct or describe")
        table, rows, usable = _table(features)
        if not usable:
            return [None] * len(features)
        prompts = [fill_prompt(self.asking.vqa_prompt, question=questions[i]) for i in usable]
        if mode == "describe":
            self._require_reader()
        answerer = Generator(self.student, self.language_model, self.asking, self.asking.vqa_max_new_tokens)
        with torch.no_grad(), autocast(self.device, self.precision):
            if mode == "describe":
                describer = Generator(self.student, self.language_model, self.asking,
                                      self.asking.caption_max_new_tokens)
                records = [{"image_id": row} for row in rows.tolist()]  # one description per distinct image
                answers, _ = described_answers(records, prompts, FeatureRows(table, rows), describer, answerer,
                                               self.asking, "predict describe")
            else:
                answers = answerer.answers(prompts, FeatureRows(table, rows), "predict")
        return _placed(answers, usable, len(features))

    def caption_features(self, features: Sequence[torch.Tensor | None]) -> list[str | None]:
        table, rows, usable = _table(features)
        if not usable:
            return [None] * len(features)
        generator = Generator(self.student, self.language_model, self.asking, self.asking.caption_max_new_tokens)
        with torch.no_grad(), autocast(self.device, self.precision):
            captions = generator.answers([fill_prompt(self.asking.caption_prompt)] * len(usable),
                                         FeatureRows(table, rows), "predict captions")
        return _placed(captions, usable, len(features))

    def _require_reader(self) -> None:
        if self.language_model is None:
            raise VlkdError("describe mode answers with the language model before distillation, which this model "
                            "was loaded without; load the packaged model, pass plm=, or use mode direct")


def _image_source(image: ImageLike | bytes) -> Path | bytes:
    """What the packer stores: a file's own bytes (by its path), or a PIL image as lossless PNG."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(image, bytes):
        return image
    path = Path(image)
    if not path.is_file():
        raise VlkdError(f"{path} is not a file; give images as PIL images or paths of image files")
    return path


def _table(features: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, torch.Tensor, list[int]]:
    """The decodable images' features once each ([n, ...]), each usable position's row, and the positions."""
    usable = [i for i, row in enumerate(features) if row is not None]
    row_of: dict[int, int] = {}  # one row per distinct tensor: an image given twice is one row
    for i in usable:
        row_of.setdefault(id(features[i]), len(row_of))
    if not usable:
        return None, torch.empty(0, dtype=torch.long), []
    table = torch.stack(list({id(features[i]): features[i] for i in usable}.values()))
    return table, torch.tensor([row_of[id(features[i])] for i in usable], dtype=torch.long), usable


def _placed(values: list[str], usable: list[int], total: int) -> list[str | None]:
    placed: list[str | None] = [None] * total
    for position, value in zip(usable, values, strict=True):
        placed[position] = value
    return placed
