"""The project a run works on, the recipe its params.yaml holds, and `key=value` overrides written into it.

DVC reads the stages' parameters from params.yaml. A params file given to a run is one of:
  - the project's own params.yaml: used as it is;
  - a recipe: a file that names every setting of every section (configs/embedded.yaml, the synthetic world;
    configs/cc3m-vitl14-bartlarge.yaml, the paper's): params.yaml becomes a copy of it, comments and all;
  - an overlay: a file that names the recipe it changes (`base: configs/embedded.yaml`, or `base:
    params.yaml` for whatever params.yaml holds now) and the settings it changes.
A file that names only some settings and no base is refused: a setting it leaves out would come from
whatever params.yaml held before, such as the synthetic world's paths in a run on a real corpus.

Overrides stay in the file after the run, the way `dvc exp run -S key=value` leaves them (`git diff
params.yaml` shows them). The file is edited round-trip (comments and order kept), validated by
vlkd.config before it replaces the old one, and left untouched when no value changes.
"""

from __future__ import annotations

import os
import re
import tempfile
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from vlkd.config import PARAMS_FILE, Params, load_params
from vlkd.errors import VlkdError

PIPELINE_FILE = "dvc.yaml"


BASE_KEY = "base"


@dataclass(frozen=True)
class Variant:
    """What a params file asks of a run: the project, the recipe params.yaml starts from (None: params.yaml
    as it is) and the overrides written over it."""

    root: Path
    recipe: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def find_project(params_file: Path | str = PARAMS_FILE) -> Variant:
    """The project and the variant a params file names (see the module's docstring). Its paths are
    relative to the project that holds the file, or else the one that holds the working directory. A
    mapping of named entries (evaluate.benchmarks, pipeline.secrets) is replaced whole, so an overlay's
    benchmarks are the only ones; sections are merged key by key."""
    path = Path(params_file).expanduser().resolve()
    if not path.is_file():
        raise VlkdError(f"params file {path} does not exist; pass the project's params.yaml, a recipe or an overlay")
    if path.name == PARAMS_FILE and (path.parent / PIPELINE_FILE).is_file():
        return Variant(path.parent)
    root = _nearest_project(path.parent) or _nearest_project(Path.cwd())
    if root is None:
        raise VlkdError(f"{path} is not a project's params.yaml (no {PIPELINE_FILE} next to it) and no project "
                        f"(a folder with {PIPELINE_FILE} and {PARAMS_FILE}) holds the working directory; "
                        "run from inside the project")
    return _variant(root, path, seen=())


def _variant(root: Path, path: Path, seen: tuple[Path, ...]) -> Variant:
    """A recipe, or an overlay on its base (which may be an overlay too)."""
    if path in seen:
        raise VlkdError(f"{path} is its own base (through {' -> '.join(map(str, seen))}); fix the `base:` keys")
    raw = read_params_file(path)
    base = raw.pop(BASE_KEY, None)
    if base is None:
        missing = missing_settings(raw)
        if missing:
            raise VlkdError(f"{path} names some settings and no recipe they change ({len(missing)} left out, e.g. "
                            f"{', '.join(missing[:3])}): name its base on the first line (`base: "
                            "configs/cc3m-vitl14-bartlarge.yaml`, the paper's recipe; `base: configs/embedded.yaml`, "
                            "the synthetic world's; `base: params.yaml`, what params.yaml holds now) or give every "
                            "setting")
        return Variant(root, path)
    overrides = flatten(raw, whole=named_mappings())
    base_path = (root / base).resolve()
    if base_path == (root / PARAMS_FILE).resolve():
        return Variant(root, None, overrides)
    if not base_path.is_file():
        raise VlkdError(f"{path}: its base {base} does not exist in {root}; name a recipe file, relative to "
                        "the project")
    below = _variant(root, base_path, (*seen, path))
    return Variant(root, below.recipe, {**below.overrides, **overrides})


def read_params_file(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise VlkdError(f"{path} is not valid YAML ({getattr(err, 'problem', None) or err}); fix the file") from err
    if not isinstance(raw, dict):
        raise VlkdError(f"{path} must hold sections (a mapping), not {type(raw).__name__}")
    return raw


def missing_settings(raw: Mapping[str, Any], model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """The dotted settings of `model` that `raw` leaves to the code's defaults (a fixed section's keys, not
    the entries of a named mapping)."""
    missing = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            missing.append(key)
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            value = raw[name]
            missing += missing_settings(value if isinstance(value, Mapping) else {}, info.annotation, key + ".")
    return missing


def _nearest_project(start: Path) -> Path | None:
    for folder in (start.resolve(), *start.resolve().parents):
        if (folder / PIPELINE_FILE).is_file() and (folder / PARAMS_FILE).is_file():
            return folder
    return None


def flatten(tree: Mapping[str, Any], prefix: str = "", whole: frozenset[str] = frozenset()) -> dict[str, Any]:
    """{"teacher": {"epochs": 1}} -> {"teacher.epochs": 1}; lists, scalars and the keys in `whole` are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and name not in whole:
            flat.update(flatten(value, name + ".", whole))
        else:
            flat[name] = value
    return flat


def named_mappings(model: type[BaseModel] = Params, prefix: str = "") -> frozenset[str]:
    """Dotted keys of the params that map user-chosen names to entries (`dict[str, ...]` fields), as
    opposed to sections with fixed keys."""
    found: set[str] = set()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if typing.get_origin(annotation) is dict:
            found.add(prefix + name)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found |= named_mappings(annotation, f"{prefix}{name}.")
    return frozenset(found)


def parse_assignments(assignments: Iterable[str]) -> dict[str, Any]:
    """["teacher.epochs=2", "download.url_list=new.parquet"] -> overrides; values are read as YAML
    (as `dvc exp run -S` does), so 2 is a number, null is None and [a, b] is a list."""
    overrides: dict[str, Any] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VlkdError(f"override {item!r} is not key=value (e.g. teacher.epochs=2)")
        try:
            overrides[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as err:
            raise VlkdError(f"override {item!r}: the value is not valid YAML ({err.__class__.__name__})") from err
    return overrides


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _set(tree: dict, key: str, value: Any, make_map=dict) -> tuple[bool, Any]:
    """Set a dotted key in a nested mapping; returns (changed, old value)."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = make_map()
        elif not isinstance(child, dict):
            raise VlkdError(f"override {key}: {part} is a value, not a section; check the key")
        node = child
    old = node.get(parts[-1], _MISSING)
    if old is not _MISSING and _plain(old) == value:
        return False, old
    node[parts[-1]] = value
    return True, None if old is _MISSING else old


_MISSING = object()


def preview(root: Path, overrides: Mapping[str, Any], recipe: Path | None = None) -> Params:
    """The validated params the run will use (`recipe`'s, or params.yaml's, with the overrides), without
    changing any file; the paths dvc.yaml takes from them are checked to be set."""
    raw = yaml.safe_load((recipe or root / PARAMS_FILE).read_text()) or {}
    for key, value in overrides.items():
        _set(raw, key, _plain(value))
    params = _validated(root, yaml.safe_dump(raw, sort_keys=False), overrides)
    check_pipeline_paths(root, raw)
    return params


_REFERENCE = re.compile(r"\$\{\s*([\w.-]+)\s*\}")


def check_pipeline_paths(root: Path, raw: Mapping[str, Any]) -> None:
    """Every `${key}` in a stage's deps and outs names a set value: DVC fails on a null one with a bare
    AssertionError, so the user gets one line naming the stage and the key instead."""
    pipeline = yaml.safe_load((root / PIPELINE_FILE).read_text()) or {}
    for stage, spec in (pipeline.get("stages") or {}).items():
        entries = [entry for field in ("deps", "outs", "metrics", "plots") for entry in (spec or {}).get(field) or []]
        for entry in entries:
            for text in entry if isinstance(entry, Mapping) else [entry]:
                for key in _REFERENCE.findall(str(text)):
                    value = _lookup(raw, key)
                    if value is None or value == "":
                        raise VlkdError(f"the {stage} stage of {root / PIPELINE_FILE} depends on {key}, which is "
                                        f"{'not set' if value is None else 'empty'} in params.yaml; set it to a "
                                        "path (a folder may be empty; see the comment in params.yaml)")
                    if not isinstance(value, str) or "{" in value:
                        raise VlkdError(f"the {stage} stage of {root / PIPELINE_FILE} depends on {key}, which is "
                                        f"{value!r} in params.yaml; the pipeline needs one file or folder there "
                                        "(DVC cannot depend on a list or a pattern): put the files in a folder")


def _lookup(tree: Mapping[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _validated(root: Path, text: str, overrides: Mapping[str, Any]) -> Params:
    fd, name = tempfile.mkstemp(dir=root, prefix=".params-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        try:
            return load_params(Path(name))
        except VlkdError as err:
            message = str(err).replace(name, str(root / PARAMS_FILE))
            given = ", ".join(f"{k}={v!r}" for k, v in overrides.items()) or "none"
            raise VlkdError(f"{message} (overrides: {given})") from None
    finally:
        Path(name).unlink(missing_ok=True)


def use_recipe(root: Path, recipe: Path | None) -> bool:
    """params.yaml becomes a copy of `recipe` (validated first); returns whether it changed."""
    params_path = root / PARAMS_FILE
    if recipe is None or recipe.read_text() == params_path.read_text():
        return False
    _validated(root, recipe.read_text(), {})
    tmp = params_path.with_name(f".{PARAMS_FILE}.tmp-{os.getpid()}")
    tmp.write_text(recipe.read_text())
    tmp.replace(params_path)
    return True


# Not DVC's -S writer (dvc.utils.hydra): it merges mappings (benchmarks={} keeps all), skips validation, rejects `=`.
def apply_overrides(root: Path, overrides: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Write the overrides into `root/params.yaml` (round trip, validated); returns {key: (old, new)} of
    the values that changed."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    params_path = root / PARAMS_FILE
    if not overrides:
        load_params(params_path)
        return {}
    handler = YAML()
    handler.preserve_quotes = True
    handler.width = 4096
    handler.indent(mapping=2, sequence=4, offset=2)  # the layout of params.yaml
    handler.representer.add_representer(  # keep `null` as written (ruamel would leave the value empty)
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = handler.load(params_path.read_text()) or CommentedMap()
    changed: dict[str, tuple[Any, Any]] = {}
    for key, value in overrides.items():
        value = _plain(value)
        did_change, old = _set(document, key, value, make_map=CommentedMap)
        if did_change:
            changed[key] = (_plain(old), value)
    if not changed:
        load_params(params_path)
        return {}
    import io

    buffer = io.StringIO()
    handler.dump(document, buffer)
    _validated(root, buffer.getvalue(), overrides)
    tmp = params_path.with_name(f".{PARAMS_FILE}.tmp-{os.getpid()}")
    tmp.write_text(buffer.getvalue())
    tmp.replace(params_path)
    return changed
