"""Small file helpers every stage uses: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from vlkd.errors import VlkdError


def tmp_path_for(path: Path) -> Path:
    """A sibling temporary name; renaming it onto `path` is atomic on one file system."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_json_atomic(path: Path, data: dict) -> None:
    """Sorted keys, and paths inside the project written relative to it (`project_relative`), so the same
    run in another folder or on another machine writes the same bytes."""
    tmp = tmp_path_for(path)
    tmp.write_text(json.dumps(project_relative(data, path), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def project_root(anchor: Path) -> Path | None:
    """The project `anchor` lies in: the nearest folder upwards that holds params.yaml (None outside one)."""
    from vlkd.config import find_params_file

    found = find_params_file(Path(anchor).resolve().parent)
    return found.parent if found else None


def project_relative(data, anchor: Path):
    """`data` (JSON-like: dicts, lists, strings) with every absolute path inside the project of `anchor`
    written relative to the project's folder, in keys, values and within longer strings ("trained on
    /home/me/vlkd/data/shards" -> "trained on data/shards"). Paths outside the project stay absolute."""
    root = project_root(anchor)
    if root is None:
        return data
    prefix = str(root) + os.sep

    def relative(value):
        if isinstance(value, str):
            return "." if value == str(root) else value.replace(prefix, "")
        if isinstance(value, dict):
            return {relative(key): relative(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [relative(item) for item in value]
        return value

    return relative(data)


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


@contextlib.contextmanager
def building_folder(output: Path, marker: str, what: str, setting: str) -> Iterator[Path]:
    """Build a stage's output folder whole: yields an empty hidden sibling to fill, swapped in over `output`
    when the block ends, removed if it fails, so `output` is only ever the old folder or the new one.
    A non-empty `output` without the stage's `marker` file (its manifest) is refused, never overwritten:
    it is not this stage's to replace. `what` and `setting` name the folder and the params key in errors."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / marker).is_file())):
        raise VlkdError(f"{output} exists and is not a {what} folder (no {marker}); refusing to replace it: "
                        f"choose another {setting} or remove it")
    building = output.parent / f".{output.name}.building"
    try:
        remove_path(building)
        building.mkdir(parents=True)
    except OSError as err:
        raise VlkdError(f"cannot create {building} ({err.strerror}); choose a writable {setting}") from err
    try:
        yield building
        replace_folder(building, output)
    except OSError as err:
        remove_path(building)
        raise VlkdError(f"cannot write the {what} to {output} ({err.strerror or err}); check the disk's free "
                        f"space and permissions, or choose another {setting}") from err
    except BaseException:
        remove_path(building)
        raise


def params_record(section, anchor: Path) -> dict:
    """A params section as a stage records it in the manifest at `anchor`: JSON, project-relative paths
    (compare a manifest's record with this, never with the raw section)."""
    return project_relative(section.model_dump(mode="json"), anchor)


def without_output(record: dict) -> dict:
    """A stage's params record without `output`: what must be equal for a built folder to be reused
    wherever it lies."""
    return {name: value for name, value in record.items() if name != "output"}
