"""Typed view of params.yaml: the one place where defaults live.

The defaults are the VLKD paper's recipe for real use (docs/method.md): a CLIP ViT-L-14 teacher,
BART-large, the three objectives at weight 1 with a pooled-embedding prefix, direct zero-shot VQA with
the paper's prompts, and the paper's benchmarks (VQAv2 val, OK-VQA val, COCO Karpathy test) in their
published file layout under data/benchmarks. The project's params.yaml sets what the embedded synthetic
world needs instead, each with a comment saying why.

Inside a project (a folder with params.yaml, found from the working directory upwards) the file is
read and validated; elsewhere the defaults below apply. CLI flags override both. Relative paths in
params.yaml are relative to the folder that holds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlkd.errors import VlkdError

PARAMS_FILE = "params.yaml"
COCO_IMAGE = "COCO_val2014_{image_id:012d}.jpg"  # a COCO val2014 image's file name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthParams(_Section):
    """The embedded synthetic world (vlkd synth)."""

    output: Path = Path("data/world")
    seed: int = 0
    images: int = Field(10000, ge=1, description="training images in the URL list")
    eval_images: int = Field(200, ge=1, description="held-out images with VQA questions and COCO captions")
    shifted_images: int = Field(100, ge=1, description="domain-shifted held-out images")
    image_size: int = Field(96, ge=32, le=1024, description="side of the generated PNGs, in pixels")
    captions_per_image: int = Field(3, ge=1)
    task_images: int = Field(600, ge=1, description="training images with fine-tuning task files (VQA, SNLI-VE)")
    text_scenes: int = Field(20000, ge=10, description="scenes described in words for the language model")
    # The embedded teacher's own image-text pairs (pretrain/ shards), of every background and colour-shape
    # pair, as a web-scale CLIP has seen more than the corpus distilled on; 0: none (the teacher then
    # trains on the downloaded corpus, teacher.shards).
    pretrain_images: int = Field(10000, ge=0, description="the embedded teacher's pretraining images")
    # Fixed so the URL list (a DVC-tracked input) is identical from run to run; change it only if the
    # port is taken on your machine.
    port: int = Field(18473, ge=1024, le=65535)


class DownloadParams(_Section):
    """The download stage (img2dataset into webdataset shards)."""

    url_list: Path = Path("data/urls.parquet")
    output: Path = Path("data/shards")
    url_col: str = "url"
    caption_col: str = "caption"
    # A list column with every caption of the image (COCO-style), kept in each sample's json as `captions`
    # for the teacher to sample from; None: one caption per image.
    captions_col: str | None = None
    input_format: Literal["auto", "parquet", "csv", "tsv"] = "auto"
    # For headerless csv/tsv files (Conceptual Captions: [caption, url]): the column names in order.
    column_names: list[str] | None = None
    image_size: int = Field(256, ge=8)  # img2dataset's default; CLIP's preprocessing crops 224 from it
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    processes: int = Field(2, ge=1)
    threads: int = Field(16, ge=1)
    timeout: float = Field(10.0, gt=0, description="seconds per request")
    retries: int = Field(0, ge=0)
    shard_size: int = Field(1000, ge=1, description="samples per shard")
    distributor: Literal["multiprocessing", "pyspark", "ray"] = "multiprocessing"
    max_image_area: float = Field(40e6, gt=0, description="larger decoded images are recorded as failures")
    max_caption_chars: int = Field(1000, ge=1, description="longer captions are truncated and counted")
    # Sites opt out of AI use in their X-Robots-Tag header (for all agents, or for `vlkd:` by name);
    # such images are not stored but counted as failures with their own reason, as img2dataset does by
    # default. An empty list stores them anyway.
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]

    @field_validator("column_names")
    @classmethod
    def _unique_names(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"column names must be unique, got {names}")
        return names


class TeacherParams(_Section):
    """The teacher stage: an open_clip model, or the embedded one trained on shards (the world's own
    pretraining pairs, or a corpus)."""

    output: Path = Path("data/teacher")
    model: str = "ViT-L-14"
    # A pretrained tag (e.g. `openai` for ViT-L-14) or a checkpoint file: use that teacher as it is.
    # null: train the embedded model (`vlkd-tiny-resnet`) contrastively on `shards`.
    pretrained: str | None = "openai"
    shards: Path = Path("data/shards")
    # The embedded model trains on the first `train_shards` complete shards of `shards` (in name order;
    # null: all). Trained on a corpus folder, a refresh adds shards after them, so the teacher stays as it
    # was, as a pretrained CLIP would, and a refresh embeds only its new shards.
    train_shards: int | None = Field(None, ge=1)
    # Held-out images with COCO-format captions for the teacher's zero-shot retrieval check.
    eval_images: Path = Path("data/benchmarks/coco/val2014")
    eval_captions: Path = Path("data/benchmarks/coco/annotations/captions_karpathy_test.json")
    # The embedded model's input side in pixels (a multiple of 32: the ResNet's last feature map is
    # image_size/32 on a side). Images of another size are resized to it.
    image_size: int = Field(64, ge=32, multiple_of=32)
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(20, ge=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


class FeaturesParams(_Section):
    """The features stage: open_clip embeddings of every shard to Parquet."""

    # Any webdataset tars: a folder (vlkd's download: its complete shards; else every *.tar), a brace
    # pattern (/data/cc3m/{00000..00331}.tar), a tar file, or a list of these.
    shards: Path | list[Path] = Path("data/shards")

    @field_validator("shards")
    @classmethod
    def _names_shards(cls, shards: Path | list[Path]) -> Path | list[Path]:
        if isinstance(shards, list) and not shards:
            raise ValueError("an empty list names no shards; give a folder, a brace pattern or tar files")
        return shards

    output: Path = Path("data/features")
    teacher: Path = Path("data/teacher")  # a teacher folder; its manifest names the model and weights
    model: str | None = None  # with `pretrained`: use this open_clip model instead of `teacher`
    pretrained: str | None = None
    batch_size: int = Field(256, ge=1)
    num_workers: int = Field(2, ge=0, description="DataLoader processes decoding images")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    image_tokens: bool = False  # also store image tokens, ViT patches or ResNet cells (for `prefix: patch`)
    # Average-pool the tokens' spatial grid to token_grid x token_grid (ViT-L-14: 256 patches -> 16 at 4,
    # 1.69 TB -> 113 GB for CC3M; docs/benchmarks.md). null: every token.
    token_grid: int | None = Field(None, ge=1)


class PlmParams(_Section):
    """The language-model stage: a BART checkpoint, or the embedded one pretrained on the world's text."""

    output: Path = Path("data/plm")
    # A hub name or local directory (e.g. facebook/bart-large), loaded with `from_pretrained`.
    # null: train a byte-level BPE tokenizer and pretrain a small BART on `corpus` (text infilling).
    model: str | None = "facebook/bart-large"
    # The language model's text, one document per line, in the folder `text` (which DVC watches, so both
    # files may be absent): `corpus` pretrains the embedded model and is what distill.retention_weight
    # keeps; `heldout` measures infilling before and after distillation (text retention). null: none.
    text: Path = Path("data/text")
    corpus: Path | None = None
    heldout: Path | None = Path("data/text/heldout.txt")
    vocab_size: int = Field(1024, ge=300)
    d_model: int = Field(128, ge=16)
    layers: int = Field(3, ge=1, description="encoder layers, and as many decoder layers")
    heads: int = Field(4, ge=1)
    ffn_dim: int = Field(512, ge=16)
    max_positions: int = Field(128, ge=16, description="BART's position embeddings: the longest input")
    dropout: float = Field(0.0, ge=0, le=1)
    max_length: int = Field(64, ge=8, description="tokens per document, longer ones are truncated")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(100, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mask_ratio: float = Field(0.3, ge=0, le=1, description="share of tokens hidden by text infilling")
    poisson_lambda: float = Field(3.0, gt=0, description="mean masked span length")
    # Share of the documents with questions whose infilling hides exactly one answer (one span, one mask):
    # the skill VQA needs. The rest, and documents without questions, get random spans.
    answer_mask_share: float = Field(1.0, ge=0, le=1)
    qa_questions: int = Field(300, ge=1, description="held-out questions asked for the text-only QA metric")
    # Resumable state of the embedded model's pretraining, outside `output` (DVC deletes outs before a run).
    checkpoints: Path = Path("data/checkpoints/plm")
    checkpoint_every: int = Field(500, ge=1, description="optimizer steps between checkpoints")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


class DistillParams(_Section):
    """VLKD: distil the frozen teacher, through its stored features, into the language model."""

    features: Path = Path("data/features")
    plm: Path = Path("data/plm")
    output: Path = Path("data/student")
    # Start from this student instead of a fresh one (e.g. the promoted model, when retraining on a
    # refreshed corpus); its teacher must be the one that made `features`. A folder holding nothing but a
    # README: a fresh student. A student that records the rows it has seen trains on the unseen ones
    # plus `replay` seen rows per unseen one (distill/rows.py).
    init: Path | None = None
    replay: float = Field(1.0, ge=0, description="continuing from init: seen rows replayed per unseen row")
    checkpoints: Path = Path("data/checkpoints/distill")  # kept outside `output`: DVC deletes outs before a run
    plots: Path = Path("metrics/distill")  # dvclive's per-step curves, for `dvc plots`
    prefix: Literal["pooled", "patch"] = "pooled"  # visual prefix: the pooled embedding or patch tokens
    prefix_tokens: int = Field(1, ge=1, description="visual tokens made from the pooled embedding (pooled only)")
    ttdm_weight: float = Field(1.0, ge=0)
    itcl_weight: float = Field(1.0, ge=0)
    icti_weight: float = Field(1.0, ge=0)
    # Text retention (not in the paper): the language model's infilling on its own corpus (plm.corpus,
    # found through the language model's folder), no image.
    retention_weight: float = Field(0.0, ge=0)
    # Caption reading (not in the paper, distill/reading.py): with the image prefix in front of a question of
    # plm.corpus, the student answers as the frozen language model does with the image's caption in front.
    reading_weight: float = Field(0.0, ge=0)
    reading_prompt: str = "Question: {question} Answer: <mask>"  # the zero-shot VQA prompt (evaluate.vqa_prompt)
    ttdm_distance: Literal["mse", "cosine"] = "mse"
    itcl_temperature: float = Field(0.01, gt=0, description="CLIP's temperature; the starting value if learnable")
    itcl_learnable_temperature: bool = False
    mask_ratio: float = Field(0.3, ge=0, le=1)
    whole_caption_share: float = Field(0.0, ge=0, le=1)  # not in the paper: ICTI captions masked whole
    whole_caption_keep: int = Field(0, ge=0)  # not in the paper: such a caption keeps up to this many first tokens
    poisson_lambda: float = Field(3.0, gt=0)
    max_length: int = Field(64, ge=8, description="caption tokens, longer ones are truncated")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(50, ge=0)
    schedule: Literal["cosine", "linear"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(100, ge=1, description="optimizer steps between checkpoints")
    compile: bool = False  # torch.compile the student
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _keep_needs_whole_captions(self) -> DistillParams:
        if self.whole_caption_keep and not self.whole_caption_share:
            raise ValueError("whole_caption_keep applies to the captions masked whole, and whole_caption_share is 0; "
                             "set whole_caption_share above 0 or whole_caption_keep to 0")
        return self

    @model_validator(mode="after")
    def _prefix_tokens_need_the_pooled_prefix(self) -> DistillParams:
        if self.prefix_tokens != 1 and self.prefix != "pooled":
            raise ValueError(f"prefix_tokens {self.prefix_tokens} applies to the pooled prefix only, and prefix "
                             f"is {self.prefix} (a token per image token); set prefix_tokens: 1 or prefix: pooled")
        return self


class BenchmarkSpec(_Section):
    """One evaluation set in the public formats (VQAv2/OK-VQA questions and annotations, COCO captions)."""

    task: Literal["vqa", "caption"]
    images: Path  # folder of the images
    image_pattern: str = COCO_IMAGE  # file name of an image id
    questions: Path | None = None  # vqa
    annotations: Path  # vqa annotations, or COCO caption annotations

    @model_validator(mode="after")
    def _vqa_needs_questions(self) -> BenchmarkSpec:
        if self.task == "vqa" and self.questions is None:
            raise ValueError("a vqa benchmark needs `questions` (a VQAv2-format questions file)")
        return self


_COCO = Path("data/benchmarks/coco")
# The paper's benchmarks in their published layout: COCO val2014 images (VQAv2, OK-VQA and the Karpathy
# test split are all drawn from them), the VQAv2 and OK-VQA question/annotation files as released, and
# the Karpathy test split as COCO caption annotations (e.g. LAVIS's coco_karpathy_test_gt.json).
PAPER_BENCHMARKS = {
    "vqav2": BenchmarkSpec(task="vqa", images=_COCO / "val2014",
                           questions=Path("data/benchmarks/vqav2/v2_OpenEnded_mscoco_val2014_questions.json"),
                           annotations=Path("data/benchmarks/vqav2/v2_mscoco_val2014_annotations.json")),
    "okvqa": BenchmarkSpec(task="vqa", images=_COCO / "val2014",
                           questions=Path("data/benchmarks/okvqa/OpenEnded_mscoco_val2014_questions.json"),
                           annotations=Path("data/benchmarks/okvqa/mscoco_val2014_annotations.json")),
    "coco-captions": BenchmarkSpec(task="caption", images=_COCO / "val2014",
                                   annotations=_COCO / "annotations/captions_karpathy_test.json"),
}


class EvaluateParams(_Section):
    """Zero-shot evaluation of the student, with controls, on the benchmarks below."""

    student: Path = Path("data/student")
    plm: Path = Path("data/plm")
    teacher: Path = Path("data/teacher")  # embeds the evaluation images; must be the student's teacher
    output: Path = Path("data/eval")
    # Evaluation images packed into a shard and their features (the features stage's code and format),
    # kept across runs: a new student is evaluated without embedding the images again.
    cache: Path = Path("data/cache/eval")
    # The folder that holds every benchmark's files: DVC watches it (a pipeline cannot list a varying
    # number of files), so each benchmark path must lie inside it.
    data: Path = Path("data/benchmarks")
    benchmarks: dict[str, BenchmarkSpec] = PAPER_BENCHMARKS
    curves: Path = Path("metrics/distill")  # the distillation's dvclive folder, drawn in the report
    # How VQA is asked, each mode scored with every control; the first is the headline (the top-level numbers
    # of a VQA benchmark's metrics, what the refresh gate reads). direct: the VLKD paper's zero-shot VQA,
    # [image prefix ; vqa_prompt]. describe: the student describes the image (describe_prompt) and the language
    # model answers "<description>. <vqa_prompt>" from text.
    vqa_modes: list[Literal["direct", "describe"]] = Field(["direct", "describe"], min_length=1)
    vqa_prompt: str = "Question: {question} Answer: <mask>"
    caption_prompt: str = "A picture of <mask>"
    describe_prompt: str = "A picture of <mask>"
    num_beams: int = Field(5, ge=1)
    vqa_max_new_tokens: int = Field(10, ge=1)
    caption_max_new_tokens: int = Field(30, ge=1)
    normalize: Literal["official", "always"] = "official"
    batch_size: int = Field(64, ge=1)
    report_samples: int = Field(24, ge=0, description="evaluation images shown in the HTML report")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("vqa_modes")
    @classmethod
    def _modes_once(cls, modes: list[str]) -> list[str]:
        if len(set(modes)) != len(modes):
            raise ValueError(f"names a mode twice ({modes}); list each of direct and describe at most once")
        return modes


class GateMetric(_Section):
    """A metric the refresh gate compares with the last promoted model's (flows/refresh.py)."""

    metric: str = Field(min_length=1, description="dotted key in the metrics file, e.g. vqa.overall")
    file: Path = Path("metrics/evaluate.json")  # a metrics file a stage writes, inside the project
    higher_is_better: bool = True
    tolerance: float = Field(0.0, ge=0, description="allowed worsening, in the metric's units")
    relative_tolerance: float = Field(0.0, ge=0, description="allowed worsening, as a share of the promoted value")


class ScheduleParams(_Section):
    """When the served deployment retrains (flows/serve.py)."""

    cron: str = "0 3 * * 1"  # minute hour day-of-month month day-of-week: Mondays at 03:00
    timezone: str = "UTC"
    active: bool = True  # false: the deployment is served with its schedule paused

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, cron: str) -> str:
        if len(cron.split()) not in (5, 6):
            raise ValueError(f"cron {cron!r} needs 5 fields (minute hour day month weekday), e.g. '0 3 * * 1'")
        return cron


class PipelineParams(_Section):
    """The Prefect flows (flows/): locking, retries, pushing, the refresh gate, promotion, the schedule."""

    lock_timeout: float = Field(60.0, ge=0, description="seconds a run waits for another run on the workspace")
    retries: int = Field(2, ge=0, description="extra attempts of a stage after a transient failure")
    retry_delay_seconds: float = Field(20.0, ge=0)
    # Stages that do not need each other's outputs (the teacher's branch and the language model) run at the
    # same time, up to this many; 1 runs them one after the other.
    concurrent_stages: int = Field(1, ge=1)
    push: bool = True  # `dvc push` to the default DVC remote after a successful run
    report: Path = Path("data/eval/report.html")  # linked from the run's artifact
    tag_prefix: str = Field("promoted/", pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
                            description="promoted models are git tags <prefix>v1, v2, ...")
    gate: list[GateMetric] = [
        GateMetric(metric="vqa.overall", relative_tolerance=0.05),
        GateMetric(metric="vqa-shifted.overall", relative_tolerance=0.05),
        GateMetric(metric="captions.CIDEr", relative_tolerance=0.05),
    ]
    schedule: ScheduleParams = ScheduleParams()
    # Credentials for DVC remotes from Prefect Secret blocks: environment variable -> block name, e.g.
    # {AWS_SECRET_ACCESS_KEY: aws-secret-access-key}. Set in the stage commands' environment, never logged.
    secrets: dict[str, str] = {}


class VlmParams(_Section):
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


class TaskSplit(_Section):
    """One split of a fine-tuning task in its published format: VQAv2 questions + annotations, or SNLI-VE jsonl."""

    images: Path
    image_pattern: str = COCO_IMAGE  # vqa: a file name of image_id; ve: of Flickr30K_ID (e.g. "{image_id}.jpg")
    questions: Path | None = None  # vqa
    annotations: Path | None = None  # vqa
    file: Path | None = None  # ve: snli_ve_*.jsonl


class TaskSpec(_Section):
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


class FinetuneParams(_Section):
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



class Params(_Section):
    synth: SynthParams = SynthParams()
    download: DownloadParams = DownloadParams()
    teacher: TeacherParams = TeacherParams()
    features: FeaturesParams = FeaturesParams()
    plm: PlmParams = PlmParams()
    distill: DistillParams = DistillParams()
    evaluate: EvaluateParams = EvaluateParams()
    vlm: VlmParams = VlmParams()
    finetune: FinetuneParams = FinetuneParams()
    pipeline: PipelineParams = PipelineParams()


def find_params_file(start: Path | None = None) -> Path | None:
    """The nearest params.yaml from `start` (default: the working directory) upwards."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / PARAMS_FILE
        if candidate.is_file():
            return candidate
    return None


def load_params(path: Path | None = None) -> Params:
    """Validated params from `path`, or from the project's params.yaml, or the defaults."""
    path = path or find_params_file()
    if path is None:
        return Params()
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise VlkdError(f"cannot read {path}: {err.strerror}; check the path") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "syntax error"
        raise VlkdError(f"{path} is not valid YAML{where} ({problem}); fix the file") from err
    if isinstance(raw, dict) and "base" in raw:
        raise VlkdError(f"{path} is an overlay of {raw['base']}, not a whole params file; run it with `python -m "
                        f"flows.pipeline --params {path}`, which writes it into params.yaml")
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise VlkdError(f"{path}: {_first_problem(err)}; fix params.yaml") from err
    params = _resolve_paths(params, Path(path).resolve().parent)
    if (Path(path).resolve().parent / "dvc.yaml").is_file():  # only a pipeline watches folders
        _check_watched(params, path)
    return params


def with_overrides(section: _Section, **flags) -> _Section:
    """The section with every flag that was given (not None) replacing its value, validated."""
    given = {name: value for name, value in flags.items() if value is not None}
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except ValidationError as err:
        raise VlkdError(f"bad option: {_first_problem(err)}; see --help") from err


def _first_problem(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def watched_files(params: Params) -> dict[str, tuple[Path, Path, str]]:
    """{key: (file, folder, folder key)} of the inputs that dvc.yaml watches through a folder (a stage with
    optional or many inputs depends on the folder that holds them)."""
    files = {"plm.corpus": params.plm.corpus, "plm.heldout": params.plm.heldout}
    watched = {key: (path, params.plm.text, "plm.text") for key, path in files.items() if path is not None}
    for name, spec in params.evaluate.benchmarks.items():
        for field in ("images", "questions", "annotations"):
            path = getattr(spec, field)
            if path is not None:
                watched[f"evaluate.benchmarks.{name}.{field}"] = (path, params.evaluate.data, "evaluate.data")
    for name, spec in params.finetune.tasks.items():
        for split_name in ("train", "test", "shifted"):
            split = getattr(spec, split_name)
            for field in ("images", "questions", "annotations", "file"):
                path = None if split is None else getattr(split, field)
                if path is not None:
                    watched[f"finetune.tasks.{name}.{split_name}.{field}"] = (path, params.finetune.data,
                                                                             "finetune.data")
    return watched


def _check_watched(params: Params, source: Path) -> None:
    for key, (path, folder, folder_key) in watched_files(params).items():
        if not Path(path).resolve().is_relative_to(Path(folder).resolve()):
            raise VlkdError(f"{source}: {key} ({path}) is outside {folder_key} ({folder}), the folder the pipeline "
                            f"watches for its changes; move the file under it or set {folder_key} to a folder "
                            "that holds it")


def _resolve_paths(params: Params, root: Path) -> Params:
    """Make every relative path (in sections and nested specs) relative to the folder of params.yaml."""
    return _resolve_model(params, root)


def _resolve_model(model: BaseModel, root: Path) -> BaseModel:
    return model.model_copy(update={name: _resolve_value(value, root) for name, value in model})


def _resolve_value(value, root: Path):
    if isinstance(value, Path):
        return value if value.is_absolute() else root / value
    if isinstance(value, BaseModel):
        return _resolve_model(value, root)
    if isinstance(value, list):
        return [_resolve_value(item, root) for item in value]
    if isinstance(value, dict):
        return {key: _resolve_value(item, root) for key, item in value.items()}
    return value
