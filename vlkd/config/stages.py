"""The VLKD pipeline's sections: the synthetic world, download, teacher, features, language model,
distillation and evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from vlkd.config.base import Section

COCO_IMAGE = "COCO_val2014_{image_id:012d}.jpg"  # a COCO val2014 image's file name


class SynthParams(Section):
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
    # Web-like noise in the training corpus (urls.parquet and the images it points to; never the eval or
    # shifted splits, the tasks, the text corpus or pretrain/), so a filter can be measured on a world as
    # noisy as the web is. Each share is of the `images` rows, and noisy rows REPLACE clean rows: the list
    # keeps `images` rows whatever the shares, so a filtered and an unfiltered run train on the same rows
    # at most, and a noisy world's clean rows are byte for byte the same rows of the clean world (URL,
    # captions, image file). Duplicates replace a row with a copy of another, clean row's image (listed
    # as `duplicate_of` in noise.parquet), as re-uploads take a place in a crawl that a new image would.
    # Every share 0 (the default): the world is byte-identical to one made before noise existed, and no
    # noise.parquet is written. vlkd/world/noise.py makes each kind.
    mismatched_captions: float = Field(
        0.0, ge=0, le=1, description="share of training rows whose captions are another image's, of other objects "
        "(alt-text scraped from the wrong element)")
    near_duplicates: float = Field(
        0.0, ge=0, le=1, description="share of training rows that are a near-duplicate of another training image "
        "(re-encoded as a lower-quality JPEG, slightly cropped, shifted or resized) at a URL of its own")
    exact_duplicates: float = Field(
        0.0, ge=0, le=1, description="share of training rows whose image bytes are another row's, at a URL of "
        "its own (mirrors, CDN copies)")
    boilerplate_captions: float = Field(
        0.0, ge=0, le=1, description="share of training rows whose captions are boilerplate ('image', "
        "'stock photo', 'IMG_0412.jpg', 'click to enlarge', ...)")
    small_images: float = Field(
        0.0, ge=0, le=1, description="share of training rows whose image is tiny (16-32 px) or of an extreme "
        "aspect ratio (3:1 to 5:1)")

    @model_validator(mode="after")
    def _noise_leaves_clean_rows(self) -> SynthParams:
        names = ("mismatched_captions", "near_duplicates", "exact_duplicates", "boilerplate_captions", "small_images")
        shares = {name: getattr(self, name) for name in names}
        if sum(shares.values()) >= 1:
            named = ", ".join(f"{name} {value}" for name, value in shares.items() if value)
            raise ValueError(f"the noise shares must sum to less than 1 (some rows clean), got {named}")
        return self


class DownloadParams(Section):
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


class TeacherParams(Section):
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


class FeaturesParams(Section):
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


class PlmParams(Section):
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


class DistillParams(Section):
    """VLKD: distil the frozen teacher, through its stored features, into the language model."""

    features: Path = Path("data/features")
    # The filter's folder (vlkd filter): only the rows it kept are trained on; null: every feature row.
    kept: Path | None = Path("data/filtered")
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
    # Where the text sits behind the prefix (vlkd/models/student.py): after_prefix, a plain concatenation; from_start,
    # the text at the positions of the language model's pretraining and the prefix without a text position.
    text_positions: Literal["after_prefix", "from_start"] = "after_prefix"
    # A diagnostic, not a recipe (the ladder's `aligned` rung, vlkd.evaluate.ladder): every image embedding is
    # replaced by the teacher's text embedding of the row's caption, as a perfectly aligned teacher would give;
    # evaluation then feeds such a student the text embedding of each image's first reference caption.
    aligned_teacher: bool = False
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
    max_steps: int | None = Field(None, ge=1, description="optimizer steps in all, whatever the epochs; null: epochs")
    batch_size: int = Field(64, ge=2)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(5e-4, gt=0)
    # The language model's own weights at this rate, the new projections (W_t, W_v) at `lr`; null: everything
    # at `lr`. The paper trains both and does not give their rates.
    language_model_lr: float | None = Field(None, gt=0)
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
    def _aligned_teacher_needs_the_pooled_prefix(self) -> DistillParams:
        if self.aligned_teacher and self.prefix != "pooled":
            raise ValueError("aligned_teacher stands the caption's text embedding in for the pooled image embedding; "
                             "image tokens have no text counterpart: set prefix: pooled or aligned_teacher: false")
        return self

    @model_validator(mode="after")
    def _prefix_tokens_need_the_pooled_prefix(self) -> DistillParams:
        if self.prefix_tokens != 1 and self.prefix != "pooled":
            raise ValueError(f"prefix_tokens {self.prefix_tokens} applies to the pooled prefix only, and prefix "
                             f"is {self.prefix} (a token per image token); set prefix_tokens: 1 or prefix: pooled")
        return self


BENCHMARK_FILES = ("images", "questions", "annotations", "captions", "descriptions")


class BenchmarkSpec(Section):
    """One evaluation set in the public formats (VQAv2/OK-VQA questions and annotations, COCO captions)."""

    task: Literal["vqa", "caption"]
    images: Path  # folder of the images
    image_pattern: str = COCO_IMAGE  # file name of an image id
    questions: Path | None = None  # vqa
    annotations: Path  # vqa annotations, or COCO caption annotations
    # The ladder of ceilings (vlkd.evaluate.ladder), each rung where the benchmark has its file: COCO caption
    # annotations of the images (VQA: the language model reads them), and a JSON list of {"image_id",
    # "description"} with each image's true, complete description (the embedded world has them).
    captions: Path | None = None
    descriptions: Path | None = None

    @model_validator(mode="after")
    def _vqa_needs_questions(self) -> BenchmarkSpec:
        if self.task == "vqa" and self.questions is None:
            raise ValueError("a vqa benchmark needs `questions` (a VQAv2-format questions file)")
        return self


_COCO = Path("data/benchmarks/coco")
# The paper's benchmarks in their published layout: COCO val2014 images (VQAv2, OK-VQA and the Karpathy
# test split are all drawn from them), the VQAv2 and OK-VQA question/annotation files as released, and
# the Karpathy test split as COCO caption annotations (e.g. LAVIS's coco_karpathy_test_gt.json). COCO's
# val2014 captions are the VQA benchmarks' caption rung of the ladder.
PAPER_BENCHMARKS = {
    "vqav2": BenchmarkSpec(task="vqa", images=_COCO / "val2014",
                           questions=Path("data/benchmarks/vqav2/v2_OpenEnded_mscoco_val2014_questions.json"),
                           annotations=Path("data/benchmarks/vqav2/v2_mscoco_val2014_annotations.json"),
                           captions=_COCO / "annotations/captions_val2014.json"),
    "okvqa": BenchmarkSpec(task="vqa", images=_COCO / "val2014",
                           questions=Path("data/benchmarks/okvqa/OpenEnded_mscoco_val2014_questions.json"),
                           annotations=Path("data/benchmarks/okvqa/mscoco_val2014_annotations.json"),
                           captions=_COCO / "annotations/captions_val2014.json"),
    "coco-captions": BenchmarkSpec(task="caption", images=_COCO / "val2014",
                                   annotations=_COCO / "annotations/captions_karpathy_test.json"),
}


class EvaluateParams(Section):
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
    # free: BART rewrites the whole prompt with the mask filled in and the answer is cut out of it (the paper
    # is silent on how its answer is read); forced: the decoder is given the prompt up to its <mask> and
    # writes only what follows (vlkd.models.infill.generate_texts).
    decoding: Literal["free", "forced"] = "free"
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


class PackageParams(Section):
    """The distilled model as one folder a user loads (`vlkd.load_model`, `vlkd predict`): the student, the
    teacher that embeds its images, the language model describe mode answers with, how the evaluation asked
    it, and a model card with its lineage and scorecard."""

    student: Path = Path("data/student")
    teacher: Path = Path("data/teacher")  # the student's teacher (checked against the student's record)
    plm: Path = Path("data/plm")
    evaluation: Path = Path("data/eval")  # the scorecard: evaluate's metrics.json
    url_list: Path = Path("data/urls.parquet")  # the corpus's URL list: its hash is the lineage's root
    shards: Path = Path("data/shards")  # the download's summary.json: shards and rows
    filter: Path = Path("data/filtered")  # the filter's summary.json, read when the student trained on its kept rows
    output: Path = Path("data/model")
