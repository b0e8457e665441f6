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

import yaml
from pydantic import BaseModel, ValidationError

from vlkd.config.base import Section
from vlkd.config.filter import FilterParams
from vlkd.config.finetune import VARIANTS, FinetuneParams, TaskSpec, TaskSplit, VlmParams
from vlkd.config.pipeline import GateMetric, PipelineParams, ScheduleParams
from vlkd.config.stages import (
    BENCHMARK_FILES,
    COCO_IMAGE,
    PAPER_BENCHMARKS,
    BenchmarkSpec,
    DistillParams,
    DownloadParams,
    EvaluateParams,
    FeaturesParams,
    PackageParams,
    PlmParams,
    SynthParams,
    TeacherParams,
)
from vlkd.errors import VlkdError

PARAMS_FILE = "params.yaml"

__all__ = ["BENCHMARK_FILES", "COCO_IMAGE", "PAPER_BENCHMARKS", "PARAMS_FILE", "BenchmarkSpec", "DistillParams",
           "DownloadParams", "EvaluateParams", "FeaturesParams", "FilterParams", "FinetuneParams", "GateMetric",
           "PackageParams",
           "Params",
           "PipelineParams",
           "PlmParams", "ScheduleParams", "SynthParams", "TaskSpec", "TaskSplit", "TeacherParams", "VARIANTS",
           "VlmParams",
           "find_params_file", "load_params", "watched_files", "with_overrides"]


class Params(Section):
    synth: SynthParams = SynthParams()
    download: DownloadParams = DownloadParams()
    teacher: TeacherParams = TeacherParams()
    features: FeaturesParams = FeaturesParams()
    filter: FilterParams = FilterParams()
    plm: PlmParams = PlmParams()
    distill: DistillParams = DistillParams()
    evaluate: EvaluateParams = EvaluateParams()
    package: PackageParams = PackageParams()
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


def with_overrides(section: Section, **flags) -> Section:
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
        for field in BENCHMARK_FILES:
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
