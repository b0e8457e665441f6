"""`vlkd predict`: a model's answers or captions for many images, in chunks, to Parquet or JSONL.

Inputs (`read_requests`): a folder of images (searched recursively), a folder of webdataset shards or one
`.tar`, or a Parquet / JSONL file with an `image` column (paths relative to the file) and, for VQA, a
`question` column (or one `--question` for every image); an `id` column names the rows (default: the
image's path, or the shard sample's key).

Every request gets one output row: the answer or caption, or, for an image that cannot be decoded, an
empty answer and the reason in `error` (counted, never dropped). Each row carries the model's identity (the
student's weights hash and its teacher), so predictions from different models never pass for one another.
The images are embedded chunk by chunk (the features stage's code) and answered through the evaluation's
generator, so memory stays bounded by the chunk and the answers are the ones the scorecard counted.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from vlkd.data.image_features import EXTENSIONS
from vlkd.data.webdataset import iter_shard, list_shards
from vlkd.errors import VlkdError
from vlkd.inference.model import VlkdModel
from vlkd.io import write_json_atomic

log = logging.getLogger(__name__)

TASKS = ("vqa", "caption")
OUTPUT_FORMATS = (".parquet", ".jsonl")
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.string()), ("question", pa.string()), ("task", pa.string()),
                    ("mode", pa.string()), ("answer", pa.string()), ("error", pa.string()),
                    ("student_sha256", pa.string()), ("teacher", pa.string())])


@dataclass(frozen=True)
class Request:
    id: str
    image: Path | bytes  # a file, or a shard sample's image bytes
    source: str  # where the image came from, as the output names it
    question: str | None


def predict(model: VlkdModel, source: Path, output: Path, task: str = "vqa", mode: str | None = None,
            question: str | None = None, chunk_size: int = 512,
            progress: Callable[[int, int | None], None] | None = None) -> dict:
    """Answer (task vqa) or caption every request of `source` into `output` (.parquet or .jsonl); returns
    the summary written beside it (`<output>.summary.json`): rows, answered, not decoded, the model.
    `progress(rows done, total)` is called after each chunk (a flow's progress artifact); the total is
    None, as the requests are read lazily, not counted first."""
    if task not in TASKS:
        raise VlkdError(f"unknown task {task!r}; use vqa or caption")
    if output.suffix not in OUTPUT_FORMATS:
        raise VlkdError(f"{output}: write predictions to a .parquet or .jsonl file")
    mode = (mode or model.default_mode) if task == "vqa" else None
    requests = read_requests(source, question if task == "vqa" else None, needs_question=task == "vqa")
    first = list(islice(requests, chunk_size))  # read lazily: a shard's images stay on disk until their chunk
    if not first:
        raise VlkdError(f"{source} holds no images (looked for {', '.join(sorted(set(EXTENSIONS)))} files, .tar "
                        "shards, or rows of a .parquet/.jsonl file); give a folder of images or a file of requests")
    teacher = f"{model.identity['teacher']['model']}@{model.identity['teacher']['weights_sha256'][:12]}"
    counts = {"rows": 0, "answered": 0, "not_decoded": 0}
    output.parent.mkdir(parents=True, exist_ok=True)
    with _Writer(output) as writer, tqdm(desc="predict", unit="image", disable=None) as bar:
        chunk = first
        while chunk:
            answers, undecodable = _answer_chunk(model, chunk, task, mode)
            rows = [{"id": r.id, "image": r.source, "question": r.question, "task": task, "mode": mode,
                     "answer": answer, "error": undecodable.get(i), "student_sha256": model.identity["student_sha256"],
                     "teacher": teacher} for i, (r, answer) in enumerate(zip(chunk, answers, strict=True))]
            writer.write(rows)
            counts["rows"] += len(rows)
            counts["not_decoded"] += len(undecodable)
            counts["answered"] += sum(answer is not None for answer in answers)
            bar.update(len(chunk))
            if progress is not None:
                progress(counts["rows"], None)
            chunk = list(islice(requests, chunk_size))
    summary = {**counts, "task": task, "mode": mode, "source": str(source), "output": str(output),
               "model": model.identity}
    write_json_atomic(summary_path(output), summary)
    if counts["not_decoded"]:
        log.warning("%d of %d image(s) could not be decoded: their rows have an empty answer and the reason in "
                    "`error`", counts["not_decoded"], counts["rows"])
    return summary


def summary_path(output: Path) -> Path:
    return output.with_name(output.name + ".summary.json")


def _answer_chunk(model: VlkdModel, chunk: list[Request], task: str, mode: str | None
                  ) -> tuple[list[str | None], dict[int, str]]:
    features, undecodable = model.embed([request.image for request in chunk])
    if task == "caption":
        return model.caption_features(features), undecodable
    return model.answer_features(features, [request.question or "" for request in chunk], mode), undecodable


# -- inputs ---------------------------------------------------------------------------------------------------
def read_requests(source: Path, question: str | None, needs_question: bool) -> Iterator[Request]:
    """The requests of `source` (see the module's docstring), in a stable order."""
    if not source.exists():
        raise VlkdError(f"{source} does not exist; give a folder of images, shards, or a .parquet/.jsonl file")
    if source.is_file() and source.suffix in (".parquet", ".jsonl"):
        yield from _file_requests(source, question, needs_question)
        return
    if needs_question and not question:
        raise VlkdError(f"{source} has images but no questions; pass --question, or give a .parquet/.jsonl file "
                        "with image and question columns, or use --task caption")
    if source.suffix == ".tar" or (source.is_dir() and any(source.glob("*.tar"))):
        yield from _shard_requests(source, question)
        return
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()):
            name = path.relative_to(source).as_posix()
            yield Request(id=name, image=path, source=str(path), question=question)
        return
    raise VlkdError(f"{source} is neither a folder, a .tar shard nor a .parquet/.jsonl file of requests")


def _shard_requests(source: Path, question: str | None) -> Iterator[Request]:
    for tar in list_shards(source):
        try:
            for sample in iter_shard(tar):
                yield Request(id=sample.key, image=sample.image or b"", source=f"{tar.name}/{sample.key}",
                              question=question)
        except (tarfile.TarError, OSError) as err:
            raise VlkdError(f"{tar} cannot be read ({err}); repair or remove the shard") from err


def _file_requests(path: Path, question: str | None, needs_question: bool) -> Iterator[Request]:
    rows = _read_rows(path)
    for number, row in enumerate(rows):
        where = f"{path} row {number + 1}"
        image = row.get("image")
        if not isinstance(image, str) or not image:
            raise VlkdError(f"{where} has no `image` path; each row needs an image path (relative to the file)")
        asked = row.get("question") or question
        if needs_question and not asked:
            raise VlkdError(f"{where} has no `question`; add a question column, pass --question, or use --task "
                            "caption")
        file = (path.parent / image) if not Path(image).is_absolute() else Path(image)
        yield Request(id=str(row.get("id", image)), image=file, source=image, question=asked)


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as err:
            raise VlkdError(f"{path} is not a readable Parquet file ({err})") from err
    rows = []
    for number, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise VlkdError(f"{path} line {number + 1} is not JSON ({err}); write one JSON object per line, e.g. "
                            '{"image": "a.jpg", "question": "What color is it?"}') from err
        if not isinstance(row, dict):
            raise VlkdError(f"{path} line {number + 1} is not a JSON object; write one object per line")
        rows.append(row)
    return rows


# -- output ---------------------------------------------------------------------------------------------------
class _Writer:
    """Rows appended chunk by chunk to Parquet (one row group per chunk) or JSONL, into a temporary file
    renamed over `output` once complete, so a stopped run never leaves a partial file that looks whole."""

    def __init__(self, output: Path):
        self.output = output
        self.partial = output.with_name(output.name + ".partial")
        self.parquet: pq.ParquetWriter | None = None
        self.jsonl = None

    def __enter__(self) -> _Writer:
        if self.output.suffix == ".parquet":
            self.parquet = pq.ParquetWriter(self.partial, SCHEMA)
        else:
            self.jsonl = self.partial.open("w")
        return self

    def write(self, rows: list[dict]) -> None:
        if self.parquet is not None:
            self.parquet.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
        else:
            self.jsonl.writelines(json.dumps(row) + "\n" for row in rows)

    def __exit__(self, kind, error, trace) -> None:
        (self.parquet or self.jsonl).close()
        if kind is None:
            self.partial.replace(self.output)
        else:
            self.partial.unlink(missing_ok=True)

