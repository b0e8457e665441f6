"""CLIP-TD's sections: the vision-language model and the fine-tuning protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from vlkd.config.base import Section
from vlkd.config.stages import COCO_IMAGE


class VlmParams(Section):
    """The vision-language model CLIP-TD fine-tunes: a ViLT checkpoint, or the embedded one pretrained on the
    shards with ViLT's own objectives (image-text matching and masked language modelling)."""

    output: Path = Path("data/vlm")
    # A hub name or folder of a ViLT checkpoint (loaded with `from_pretrained`); null: pretrain the embedded one.
    model: str | None = "dandelin/vilt-b32-mlm"
    shards: Path = Path("data/shards")
    # The embedded model pretrains on the first `train_shards` complete shards (null: all), so a refresh's new
    # shards leave it as it is.
    train_shards: int | None = Field(None, ge=1)
    vocab_size: int = Field(1000, ge=100, description="WordPiece tokenizer trained on the shards' captions")
    image_size: int = Field(64, ge=32, multiple_of=32, description="images resized to this side")
    patch_size: int = Field(8, ge=1)
    hidden: int = Field(128, ge=16)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    ffn_dim: int = Field(512, ge=16)
    max_length: int = Field(40, ge=8, description="text tokens, [CLS] and [SEP] included")
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    heldout_share: float = Field(0.02, ge=0, lt=1, description="pairs kept out of training for the metrics")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


class TaskSplit(Section):
    """One split of a fine-tuning task in its published format: VQAv2 questions + annotations, or SNLI-VE jsonl."""

    images: Path
    image_pattern: str = COCO_IMAGE  # vqa: a file name of image_id; ve: of Flickr30K_ID (e.g. "{image_id}.jpg")
    questions: Path | None = None  # vqa
    annotations: Path | None = None  # vqa
    file: Path | None = None  # ve: snli_ve_*.jsonl


class TaskSpec(Section):
    task: Literal["vqa", "ve"]
    train: TaskSplit
    test: TaskSplit  # in-domain
    shifted: TaskSplit | None = None  # domain-shifted

    @model_validator(mode="after")
    def _files_of_the_format(self) -> TaskSpec:
        for name in ("train", "test", "shifted"):
            split = getattr(self, name)
            if split is None:
                continue
            if self.task == "vqa" and (split.questions is None or split.annotations is None):
                raise ValueError(f"a vqa task's {name} split needs `questions` and `annotations` (VQAv2 files)")
            if self.task == "ve" and split.file is None:
                raise ValueError(f"a ve task's {name} split needs `file` (an SNLI-VE jsonl file)")
        return self


VARIANTS = ("none", "naive", "clip-td", "select-only", "weight-only")


class FinetuneParams(Section):
    """CLIP-TD: task fine-tuning of the vision-language model with targeted distillation of the frozen teacher,
    over the low-shot protocol (fractions x seeds x variants)."""

    vlm: Path = Path("data/vlm")
    teacher: Path = Path("data/teacher")
    output: Path = Path("data/finetune")
    cache: Path = Path("data/cache/finetune")  # the teacher's targets for each task's training split (Parquet)
    checkpoints: Path = Path("data/checkpoints/finetune")
    data: Path = Path("data/benchmarks")  # the folder DVC watches for the tasks' files
    tasks: dict[str, TaskSpec] = {}
    fractions: list[float] = [0.01, 0.05, 0.1, 0.25, 1.0]
    seeds: list[int] = [0, 1, 2]
    variants: list[Literal[VARIANTS]] = ["none", "naive", "clip-td"]
    ablations: list[Literal[VARIANTS]] = ["select-only", "weight-only"]
    ablation_fractions: list[float] = [0.05, 1.0]
    distill_weight: float = Field(1.0, ge=0, description="lambda")
    text_tokens: int = Field(3, ge=1, description="k: words distilled per instance")
    image_tokens: int = Field(2, ge=1, description="k: image cells distilled per instance")
    temperature: float = Field(0.01, gt=0, description="of the softmax over candidates that gives the weight")
    distance: Literal["l1", "mse", "cosine"] = "l1"
    vqa_candidate: str = "{question} {answer}"  # the text CLIP scores against the image for each answer
    answer_vocabulary: int = Field(3129, ge=2, description="most frequent training answers (VQAv2: 3129)")
    epochs: int = Field(10, ge=1)
    min_steps: int = Field(30, ge=1, description="at least this many steps, however small the subset")
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    lr: float = Field(5e-4, gt=0)
    # The task classifier, new at every run, learns at lr x this (ViLT fine-tunes its heads at 10x)
    head_lr_multiplier: float = Field(10.0, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_share: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(200, ge=1)
    save_fraction: float = 1.0  # the models of this fraction (first seed) are saved, one per variant
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("fractions", "ablation_fractions")
    @classmethod
    def _fractions_in_range(cls, fractions: list[float]) -> list[float]:
        for fraction in fractions:
            if not 0 < fraction <= 1:
                raise ValueError(f"a training fraction must lie in (0, 1], not {fraction}")
        return fractions
