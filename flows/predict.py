"""Batch prediction as a Prefect flow: a model's answers or captions for a folder of images, shards or a file
of requests (`vlkd.inference.predict`), with its progress and summary in the Prefect UI.

    which model: `model` (a packaged model's folder), else the last promoted tag's packaged model
    (params.yaml `package.output` as that tag recorded it), fetched once with `dvc get` into
    .vlkd/models/<tag>-<its DVC hash>/ and reused from there -> load it -> predict chunk by chunk (a progress
    artifact) -> the output beside the source (`predictions-<tag or student sha>.parquet`) and a summary
    artifact: rows, answered, not decoded, the model, the output

The model is fixed when the flow starts: a model promoted while it runs lands in another folder, so one
output never mixes two models. Nothing here takes the workspace lock: prediction writes no DVC output.

    python -m flows.predict SOURCE [--output out.parquet] [--task vqa|caption] [--question "..."]
                                   [--mode direct|describe] [--model data/model] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from vlkd.config import PARAMS_FILE, load_params
from vlkd.errors import VlkdError
from vlkd.inference.model import load_model
from vlkd.inference.predict import predict, read_requests
from vlkd.orchestrate.gate import relative_name
from vlkd.orchestrate.params import find_project
from vlkd.orchestrate.promote import Promoted, fetch_at, last_promoted, locked_md5, recorded_param

PROGRESS_ARTIFACT = "vlkd-predict-progress"
SUMMARY_ARTIFACT = "vlkd-predict"
MODELS_FOLDER = ".vlkd/models"  # promoted models fetched for prediction, one folder per tag and content (gitignored)


# ---------------------------------------------------------------------------------------------------
# Which model: a folder, or the last promoted tag's packaged model fetched once
# ---------------------------------------------------------------------------------------------------
def tag_label(tag: str) -> str:
    """A tag as part of a file name: promoted/v3 -> promoted-v3."""
    return tag.replace("/", "-")


def packaged_output_at(root: Path, tag: str, default: Path) -> tuple[str, str]:
    """(path, DVC md5) of the packaged model the commit `tag` recorded: `package.output` as its params.yaml
    had it (else `default`), and that output's hash in its dvc.lock."""
    recorded = recorded_param(root, tag, "package", "output")
    output = recorded if isinstance(recorded, str) else relative_name(default, root)
    md5 = locked_md5(root, tag, output)
    if md5 is None:
        raise VlkdError(f"{tag} recorded no packaged model ({output} is not in its dvc.lock): it was promoted "
                        "before the package stage ran; promote a model with the refresh flow, or pass --model "
                        "with a packaged model's folder")
    return output, md5


def promoted_model_folder(root: Path, tag: str, output: str, md5: str) -> tuple[Path, bool]:
    """(the folder holding `output` as `tag` recorded it, whether it was fetched now). Named by the tag and
    the content's hash, so it is fetched once and reused by every later run on that tag; fetched into a
    hidden sibling and renamed into place, so a folder of that name is always whole."""
    folder = root / MODELS_FOLDER / f"{tag_label(tag)}-{md5[:12]}"
    if folder.is_dir():
        return folder, False
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetching-") as scratch:
        fetched = Path(scratch) / "model"
        reason = fetch_at(root, tag, output, fetched)
        if reason is not None:
            raise VlkdError(f"cannot fetch {output} as {tag} recorded it ({reason}); `dvc pull` its data, or pass "
                            "--model with a packaged model's folder")
        try:
            fetched.rename(folder)
        except OSError:  # another run fetched the same content first: use theirs, ours is discarded
            if not folder.is_dir():
                raise
    return folder, True


@task(name="fetch promoted model", cache_policy=NO_CACHE)
def fetch_promoted(root: str, tag: str, output: str, md5: str) -> str:
    """promoted_model_folder as a task: the fetch (or the reuse) shows in the flow run with its log line."""
    logger = get_run_logger()
    folder, fetched = promoted_model_folder(Path(root), tag, output, md5)
    logger.info("%s %s of %s (md5 %s) %s %s", "fetched" if fetched else "reusing", output, tag, md5[:12],
                "into" if fetched else "from", folder)
    return str(folder)


def last_promoted_model(params_file: str) -> tuple[Path, Promoted]:
    """(the last promoted packaged model's folder, fetched if needed; its tag)."""
    root = find_project(params_file).root
    params = load_params(root / PARAMS_FILE)
    last = last_promoted(root, params.pipeline.tag_prefix)
    if last is None:
        raise VlkdError(f"no model has been promoted in {root} (no {params.pipeline.tag_prefix}vN tag); pass --model "
                        "with a packaged model's folder (data/model after `dvc repro package`), or promote one with "
                        "the refresh flow")
    output, md5 = packaged_output_at(root, last.tag, params.package.output)
    return Path(fetch_promoted(str(root), last.tag, output, md5)), last


# ---------------------------------------------------------------------------------------------------
# Outputs and progress
# ---------------------------------------------------------------------------------------------------
def default_output(source: Path, label: str) -> Path:
    """Beside the source: <folder>/predictions-<label>.parquet, or <stem>.predictions-<label>.parquet beside
    a file; `label` names the model (its tag, or its student's hash) and, for captions, the task, so two
    models' or two tasks' outputs never collide."""
    if source.is_dir():
        return source / f"predictions-{label}.parquet"
    return source.with_name(f"{source.stem}.predictions-{label}.parquet")


def request_count(source: Path, task: str, question: str | None) -> int | None:
    """How many rows predict will write, for the progress bar (reading the source's list, never an image), or
    None for shards, whose samples are only known by reading the shards whole. Bad sources fail here, early."""
    if source.suffix == ".tar" or (source.is_dir() and any(source.glob("*.tar"))):
        return None
    return sum(1 for _ in read_requests(source, question if task == "vqa" else None, needs_question=task == "vqa"))


def progress_reporter(total: int | None) -> Callable[[int, int | None], None]:
    """A progress artifact, and the callback predict calls after each chunk to update it."""
    artifact = create_progress_artifact(0.0, key=PROGRESS_ARTIFACT,
                                        description=f"vlkd predict: 0 of {total if total is not None else '?'} rows")
    logger = get_run_logger()

    def report(done: int, counted: int | None) -> None:
        known = counted if counted is not None else total
        share = 100.0 * min(done / known, 1.0) if known else 0.0
        update_progress_artifact(artifact, share,
                                 description=f"vlkd predict: {done} of {known if known is not None else '?'} rows")
        logger.info("predicted %d of %s rows", done, known if known is not None else "?")

    return report


def short_hashes(sha256: str | dict | None) -> str:
    """A manifest's sha256 (one, or one per file) in a few characters each, for a line of markdown."""
    if isinstance(sha256, dict):
        return "".join(f", {name} `{str(value)[:12]}`" for name, value in sorted(sha256.items()))
    return f", sha256 `{sha256[:12]}`" if isinstance(sha256, str) else ""


def model_lines(result: dict[str, Any]) -> list[str]:
    """The model a prediction used, as markdown list items: where it came from and what it is."""
    identity = result["model"]
    teacher, plm = identity.get("teacher") or {}, identity.get("plm") or {}
    return [f"- promoted tag: `{result['promoted_tag'] or 'none (a folder given)'}`",
            f"- folder: `{result['model_folder']}`",
            f"- student sha256: `{identity['student_sha256']}`",
            f"- teacher: `{teacher.get('model', '?')}`{short_hashes(teacher.get('weights_sha256'))}",
            f"- language model: `{plm.get('name') or plm.get('source') or '?'}`{short_hashes(plm.get('sha256'))}"]


def publish_summary(result: dict[str, Any]) -> None:
    """A markdown artifact: the counts, the model's identity and where the output is."""
    asked = f"{result['task']}" + (f", mode {result['mode']}" if result["mode"] else "")
    lines = ["# vlkd predict", "", f"Task: {asked}", "", "| rows | answered | not decoded |", "|---:|---:|---:|",
             f"| {result['rows']} | {result['answered']} | {result['not_decoded']} |", "", "## Model", "",
             *model_lines(result), "", "## Output", "", f"- predictions: `{result['output']}`",
             f"- summary: `{result['output']}.summary.json`", f"- source: `{result['source']}`"]
    create_markdown_artifact(key=SUMMARY_ARTIFACT, markdown="\n".join(lines) + "\n",
                             description="vlkd batch prediction: counts, the model, the output")


# ---------------------------------------------------------------------------------------------------
# The flow
# ---------------------------------------------------------------------------------------------------
@flow(name="vlkd-predict")
def batch_predict(source: str, output: str | None = None, task: str = "vqa", question: str | None = None,
                  mode: str | None = None, model: str | None = None, params_file: str = PARAMS_FILE,
                  chunk_size: int = 512) -> dict[str, Any]:
    """Answer or caption every image of `source` with one model.

    Args:
        source: a folder of images or of webdataset shards, a .tar shard, or a .parquet/.jsonl file of
            requests (`image`, and for VQA `question`, columns).
        output: a .parquet or .jsonl file; None: beside the source, named after the model.
        task: vqa | caption.
        question: the question for every image (VQA on a folder or shards).
        mode: direct | describe; None: the mode the evaluation headlined.
        model: a packaged model's folder; None: the last promoted model of the project of `params_file`.
        params_file: the project's params.yaml (the promotion tags' prefix and package.output).
        chunk_size: images embedded and answered at a time (memory is bounded by it).
    """
    logger = get_run_logger()
    source_path = Path(source).expanduser().resolve()
    total = request_count(source_path, task, question)
    if model is not None:
        folder, promoted = Path(model).expanduser().resolve(), None
    else:
        folder, promoted = last_promoted_model(params_file)
    loaded = load_model(folder)
    label = tag_label(promoted.tag) if promoted else loaded.identity["student_sha256"][:12]
    label = label if task == "vqa" else f"{label}-{task}"
    target = Path(output).expanduser().resolve() if output else default_output(source_path, label)
    logger.info("model %s (%s, student %s): %s %s -> %s", folder, promoted.tag if promoted else "a folder given",
                loaded.identity["student_sha256"][:12], task, source_path, target)
    report = progress_reporter(total)
    summary = predict(loaded, source_path, target, task=task, mode=mode, question=question, chunk_size=chunk_size,
                      progress=report)
    if total is None:  # shards: not counted before, so the bar reaches 100% only now
        report(summary["rows"], summary["rows"])
    result = {**summary, "model_folder": str(folder), "promoted_tag": promoted.tag if promoted else None}
    logger.info("%d rows: %d answered, %d not decoded -> %s", summary["rows"], summary["answered"],
                summary["not_decoded"], target)
    publish_summary(result)
    return result


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Batch prediction with the last promoted (or a given) vlkd model.")
    parser.add_argument("source", help="a folder of images or shards, a .tar shard, or a .parquet/.jsonl of requests")
    parser.add_argument("--output", help="a .parquet or .jsonl file (default: beside the source, named after the "
                        "model)")
    parser.add_argument("--task", default="vqa", choices=("vqa", "caption"))
    parser.add_argument("--question", help="the question for every image (VQA on a folder or shards)")
    parser.add_argument("--mode", choices=("direct", "describe"), help="VQA mode (default: the evaluation's "
                        "headline)")
    parser.add_argument("--model", help="a packaged model's folder (default: the last promoted model)")
    parser.add_argument("--params", default=PARAMS_FILE, help="the project's params.yaml")
    parser.add_argument("--chunk-size", type=int, default=512, help="images embedded and answered at a time")
    args = parser.parse_args(argv)
    try:
        result = batch_predict(source=args.source, output=args.output, task=args.task, question=args.question,
                               mode=args.mode, model=args.model, params_file=args.params, chunk_size=args.chunk_size)
    except VlkdError as err:
        print("vlkd: error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    print(f"{result['rows']} rows: {result['answered']} answered, {result['not_decoded']} not decoded")
    student = result["model"]["student_sha256"][:12]
    print(f"model: {result['promoted_tag'] or result['model_folder']} (student {student})")
    print(f"predictions: {result['output']} (summary: {result['output']}.summary.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
