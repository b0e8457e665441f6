"""What a stage run read, and the one decision whether a stage may reuse the outputs that are there.

A stage run's record holds:
  inputs     the content hash of every file or folder the stage reads (as its params have it: a pretrained
             teacher reads no training shards), or a finer record the stage computes itself (the teacher's
             first `train_shards` shards, say)
  params     its params section as JSON, paths relative to the project (`output` left out, so a folder is
             reusable wherever it lies)
  code       the sha256 of every vlkd module the stage's entry module imports, transitively: the same files
             dvc.yaml lists as the stage's code dependencies (tests/test_pipeline_deps.py checks both ways)
  libraries  the versions of the libraries whose behaviour shapes the results
  outputs    the sha256 of every file the stage wrote, so a damaged folder is rebuilt, not trusted

It is written into the output folder with the outputs (inside the folder built whole, so never without
them), and `reusable` is the only test a stage applies before skipping. DVC re-runs a stage when one of its
dependencies changes; the stage then sees the same change in its record and recomputes, so the two never
disagree about "up to date".

`fingerprint` is the project's one way to name a JSON-like value by its content.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import logging
import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from vlkd.io import project_relative, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

RECORD = "vlkd-record.json"
FORMAT = 1
# The libraries whose version can change what a stage computes from the same inputs (kernels, tokenizers,
# generation, image decoding, file encodings); a version change recomputes rather than mixing two of them.
RESULT_LIBRARIES = ("torch", "transformers", "tokenizers", "open_clip_torch", "numpy", "pillow", "pyarrow")
# Not part of a stage's code: the typed params (every value reaches the record through `params`, as it
# reaches DVC through params.yaml) and the error type (messages only). A folder ends with "/".
NOT_CODE = ("vlkd/config/", "vlkd/errors.py")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds vlkd/


def fingerprint(value) -> str:
    """sha256 of `value` (JSON-like) as canonical JSON: sorted keys, no whitespace."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """A file's sha256, remembered by (path, size, modification time, inode) as DVC's state database does,
    so a stage that checks a corpus of large shards or a large model reads each file once, not every run.
    VLKD_HASH_CACHE names the cache file ("off": hash every time)."""
    return files_sha256([path])[0]


def files_sha256(paths: list[Path]) -> list[str]:
    """`file_sha256` of each path, with one connection to the cache."""
    with _HashCache() as cache:
        return [cache.sha256(path) for path in paths]


class _HashCache:
    """The file-hash cache (SQLite). Each insert commits at once (autocommit), so no process holds the
    write lock while it hashes a large file, and ranks or test workers sharing the cache never wait on
    one another for long; a cache that cannot be opened, read or written is passed by: hashing works."""

    def __enter__(self) -> _HashCache:
        where = os.environ.get("VLKD_HASH_CACHE", str(Path.home() / ".cache" / "vlkd" / "file-hashes.sqlite"))
        self.connection: sqlite3.Connection | None = None
        if where != "off":
            try:
                Path(where).parent.mkdir(parents=True, exist_ok=True)
                self.connection = sqlite3.connect(where, timeout=30, isolation_level=None)
                self.connection.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, "
                                        "mtime_ns INTEGER, inode INTEGER, sha256 TEXT)")
            except (OSError, sqlite3.Error) as err:
                log.debug("file-hash cache %s unusable (%s); hashing without it", where, err)
                self.connection = None
        return self

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        row = self._execute("SELECT sha256 FROM files WHERE path=? AND size=? AND mtime_ns=? AND inode=?", key)
        if row:
            return row[0]
        digest = sha256_file(path)
        self._execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", (*key, digest))
        return digest

    def _execute(self, statement: str, values: tuple):
        if self.connection is None:
            return None
        try:
            return self.connection.execute(statement, values).fetchone()
        except sqlite3.Error as err:  # locked longer than the timeout, or the file went bad: hash without it
            log.debug("file-hash cache passed by (%s)", err)
            return None

    def __exit__(self, *exc) -> None:
        if self.connection is not None:
            self.connection.close()


def content_hash(path: Path) -> str | None:
    """A file's sha256; a folder's fingerprint of {relative path: sha256} over its files (hidden names,
    a stage's partial or temporary files, and this module's record are left out); None if absent."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        return fingerprint(folder_hashes(path))
    return None


def folder_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every visible file under `folder`, the record file excluded."""
    files = {}
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        if file.is_file() and file.name != RECORD and not any(part.startswith(".") for part in relative.parts):
            files[relative.as_posix()] = file
    return dict(zip(files, files_sha256(list(files.values())), strict=True))


def module_file(name: str, root: Path = PACKAGE_ROOT) -> Path | None:
    path = root / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(entries: list[str], root: Path = PACKAGE_ROOT) -> set[str]:
    """Every vlkd source file (relative to `root`, posix) that the `entries` (module names, or files
    relative to `root`) import, transitively, imports inside functions included; empty files hold no code."""
    seen: set[Path] = set()
    pending = [root / entry if entry.endswith(".py") else module_file(entry, root) for entry in entries]
    while pending:
        path = pending.pop()
        if path is None or path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlkd"):
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.startswith("vlkd")]
            pending += [module_file(name, root) for name in names]
    return {path.relative_to(root).as_posix() for path in seen if path.stat().st_size}


def is_code(name: str) -> bool:
    """Whether a vlkd file (relative, posix) is part of a stage's code (see NOT_CODE)."""
    return not any(name == entry or (entry.endswith("/") and name.startswith(entry)) for entry in NOT_CODE)


def code_files(entries: list[str]) -> set[str]:
    """The vlkd files a stage's entry modules run, less NOT_CODE: its record's code, dvc.yaml's code deps."""
    return {name for name in imported_files(entries) if is_code(name)}


def stage_code(entries: list[str]) -> dict[str, str]:
    """{file: sha256} of the code a stage runs."""
    return {name: sha256_file(PACKAGE_ROOT / name) for name in sorted(code_files(entries))}


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in RESULT_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _hashed(value: Path | dict) -> str | dict | None:
    if isinstance(value, dict):
        return dict(zip(value, files_sha256(list(value.values())), strict=True))
    return content_hash(value)


@dataclass(frozen=True)
class StageRecord:
    stage: str
    inputs: dict
    params: dict
    code: dict
    libraries: dict

    @classmethod
    def of(cls, stage: str, entry: str, params, inputs: dict, anchor: Path) -> StageRecord:
        """The record of running `stage` (entry module `entry`) with `params` (its section) on `inputs`
        ({name: a path, or {name: path} for a chosen set such as a teacher's training shards}: each path
        becomes its content hash). `anchor`: a path in the output folder, for the project-relative paths."""
        hashed = {name: _hashed(value) for name, value in inputs.items()}
        section = {key: value for key, value in params.model_dump(mode="json").items() if key != "output"}
        return cls(stage, project_relative(hashed, anchor), project_relative(section, anchor), stage_code([entry]),
                   library_versions())

    @property
    def key(self) -> str:
        return fingerprint(asdict(self))

    def write(self, folder: Path) -> None:
        """Into the stage's finished (or being built) folder, with the hashes of what it holds now."""
        write_json_atomic(folder / RECORD, {"format": FORMAT, **asdict(self), "key": self.key,
                                            "outputs": folder_hashes(folder)})

    def reusable(self, folder: Path) -> bool:
        """Whether `folder` was made by a run with this record and still holds what that run wrote; logs why not."""
        why = self._stale(Path(folder))
        if why:
            log.info("%s: the outputs in %s are not reused: %s", self.stage, folder, why)
        return not why

    def _stale(self, folder: Path) -> str | None:
        path = folder / RECORD
        if not path.is_file():
            return f"no {RECORD} (not made by this stage, or before records)"
        try:
            saved = json.loads(path.read_text())
        except ValueError as err:
            return f"{RECORD} is unreadable ({err})"
        if saved.get("format") != FORMAT or saved.get("key") != self.key:
            return "it was made from other " + (", ".join(self.changed(saved)) or "records")
        if folder_hashes(folder) != saved.get("outputs"):
            return "its files differ from the ones the record lists"
        return None

    def changed(self, saved: dict) -> list[str]:
        """What differs from an earlier run's record: 'inputs (shards)', 'code (vlkd/io.py)', ..."""
        parts = []
        for part, now in asdict(self).items():
            before = saved.get(part)
            if before == now:
                continue
            if isinstance(now, dict) and isinstance(before, dict):
                names = sorted(name for name in set(now) | set(before) if now.get(name) != before.get(name))
                parts.append(f"{part} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
            else:
                parts.append(part)
        return parts
