"""Small file helpers every stage uses: atomic writes and content hashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def tmp_path_for(path: Path) -> Path:
    """A sibling temporary name; renaming it onto `path` is atomic on one file system."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = tmp_path_for(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove_path(path: Path) -> None:
    """Remove a file, a link or a folder tree, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_folder(built: Path, output: Path) -> None:
    """Swap a finished folder in: at every moment `output` is the old folder, the new one, or (between
    two renames) absent; never half written."""
    old = output.parent / (output.name + ".old")
    remove_path(old)
    if output.exists():
        output.rename(old)
    built.rename(output)
    remove_path(old)


def without_output(record: dict) -> dict:
    """A stage's params record without `output`: what must be equal for a built folder to be reused
    wherever it lies."""
    return {name: value for name, value in record.items() if name != "output"}
