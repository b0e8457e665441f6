"""Promotion in git: the promoted model is a commit of dvc.lock (which names every output by hash),
params.yaml, dvc.yaml and the metric files, tagged `<prefix>vN` (N counts up).

Any promoted model comes back with `git checkout <tag> -- dvc.lock params.yaml <metric files> &&
dvc checkout --force <its stages>` (restore_command), or `git checkout <tag> && dvc checkout` for the whole
commit; its data is in the DVC cache, and on the remote after `dvc push` (`dvc pull` first on another
machine). The last
promoted model's metrics are read from its tag (`git show <tag>:<file>`), so nothing but git holds
the record.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vlkd.errors import VlkdError
from vlkd.orchestrate.metrics import parse_metrics

FALLBACK_IDENTITY = ("-c", "user.name=vlkd pipeline", "-c", "user.email=vlkd@localhost")


def git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise VlkdError("git is not installed; promotion is recorded in git, install it") from err
    if check and done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise VlkdError(f"git {' '.join(args[:2])} failed in {root}: {message[-1] if message else done.returncode}")
    return done


def require_repo(root: Path) -> None:
    if git(root, "rev-parse", "--is-inside-work-tree", check=False).returncode != 0:
        raise VlkdError(f"{root} is not a git repository; promotion records the model in git: "
                        "`git init && git add -A && git commit -m init` first")


@dataclass(frozen=True)
class Promoted:
    tag: str
    commit: str
    number: int


def _tag_number(tag: str, prefix: str) -> int | None:
    match = re.fullmatch(re.escape(prefix) + r"v(\d+)", tag)
    return int(match.group(1)) if match else None


def last_promoted(root: Path, prefix: str) -> Promoted | None:
    """The promoted tag with the highest number, or None."""
    done = git(root, "tag", "--list", f"{prefix}v*", check=False)
    numbered = [(number, tag) for tag in done.stdout.split() if (number := _tag_number(tag, prefix)) is not None]
    if not numbered:
        return None
    number, tag = max(numbered)
    commit = git(root, "rev-list", "-n", "1", tag).stdout.strip()
    return Promoted(tag, commit, number)


def metrics_at(root: Path, ref: str, files: Iterable[str]) -> dict[str, dict]:
    """{file: metrics} as committed at `ref` (files missing there are left out)."""
    found = {}
    for name in files:
        done = git(root, "show", f"{ref}:{name}", check=False)
        if done.returncode == 0:
            data = parse_metrics(done.stdout, name)
            if data is not None:
                found[name] = data
    return found


def _identity(root: Path) -> tuple[str, ...]:
    has_email = git(root, "config", "user.email", check=False).stdout.strip()
    return () if has_email else FALLBACK_IDENTITY


# Not GTO: its tags are name@vX.Y.Z, not the tag_prefix + vN that params.yaml names; and it only tags, never commits.
def promote(root: Path, prefix: str, paths: Iterable[str], message: str) -> Promoted:
    """Commit `paths` (only those: other staged or changed files are left alone) and tag the commit
    `<prefix>vN`. If the files are as the last promoted tag has them, that tag is returned instead."""
    require_repo(root)
    paths = sorted({p for p in paths if (root / p).exists()})
    last = last_promoted(root, prefix)
    if last is not None and not _differs(root, last.tag, paths):
        return last
    git(root, "add", "--", *paths)
    if git(root, "diff", "--cached", "--quiet", "HEAD", "--", *paths, check=False).returncode != 0:
        git(root, *_identity(root), "commit", "--quiet", "--no-verify", "-m", message, "--", *paths)
    commit = git(root, "rev-parse", "HEAD").stdout.strip()
    number = (last.number if last else 0) + 1
    tag = f"{prefix}v{number}"
    git(root, *_identity(root), "tag", "-a", tag, "-m", message, commit)
    return Promoted(tag, commit, number)


def _differs(root: Path, ref: str, paths: list[str]) -> bool:
    """Whether the working copies of `paths` differ from `ref` (files new since `ref` count)."""
    for path in paths:
        done = git(root, "diff", "--quiet", ref, "--", path, check=False)
        if done.returncode != 0:
            return True
        if git(root, "cat-file", "-e", f"{ref}:{path}", check=False).returncode != 0:
            return True
    return False


def dirty_tracked(root: Path, exclude: Iterable[str] = ()) -> list[str]:
    """Tracked files with uncommitted changes, besides `exclude` (a promoted commit would not hold them)."""
    skip = set(exclude)
    done = git(root, "status", "--porcelain", "--untracked-files=no", check=False)
    return [line[3:] for line in done.stdout.splitlines() if line[3:] not in skip]


def files_at(root: Path, ref: str, paths: Iterable[str]) -> list[str]:
    """Those of `paths` (files or folders) that `ref` holds."""
    paths = list(paths)
    if not paths:
        return []
    done = git(root, "ls-tree", "-r", "--name-only", ref, "--", *paths, check=False)
    held = set(done.stdout.splitlines())
    return [p for p in paths if p in held or any(name.startswith(p.rstrip("/") + "/") for name in held)]


def _lock_at(root: Path, ref: str) -> dict:
    import yaml

    done = git(root, "show", f"{ref}:dvc.lock", check=False)
    try:
        lock = yaml.safe_load(done.stdout) if done.returncode == 0 else None
    except yaml.YAMLError:
        lock = None
    return lock if isinstance(lock, dict) else {}


def locked_md5(root: Path, ref: str, output: str) -> str | None:
    """The md5 DVC recorded for the output `output` in dvc.lock at `ref` (a folder's without its `.dir`)."""
    for stage in (_lock_at(root, ref).get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == output and out.get("md5"):
                return str(out["md5"]).removesuffix(".dir")
    return None


def locked_stages(root: Path, ref: str) -> list[str]:
    """The stages the dvc.lock at `ref` records."""
    return list(_lock_at(root, ref).get("stages") or {})


def locked_outputs(root: Path, ref: str) -> set[str]:
    """The output paths the dvc.lock at `ref` records (as dvc.yaml names them)."""
    stages = (_lock_at(root, ref).get("stages") or {}).values()
    return {out["path"] for stage in stages for out in stage.get("outs") or [] if "path" in out}


def restore_command(tag: str, paths: Iterable[str] = ("dvc.lock", "params.yaml"),
                    stages: Iterable[str] = ()) -> str:
    """The shell command that puts the model promoted as `tag` back into the workspace: its pipeline,
    lock, params and metric files from git, then the data of the stages it recorded from the DVC cache."""
    return f"git checkout {tag} -- {' '.join(paths)} && dvc checkout --force {' '.join(stages)}".rstrip()


def restore_command_at(root: Path, tag: str, paths: Iterable[str]) -> str:
    """restore_command for the recorded `paths` the tag holds; dvc.yaml is left as it is (the pipeline
    may have grown since; the lock names the promoted outputs)."""
    paths = [p for p in paths if p != "dvc.yaml"]
    return restore_command(tag, files_at(root, tag, paths), locked_stages(root, tag))


def place_output_at(root: Path, ref: str, output: str, folder: Path, keep: Iterable[str] = ("README.md",)) -> None:
    """Fill `folder` with the DVC output `output` as the commit `ref` recorded it (`dvc get . <output>
    --rev <ref>`, from the cache or the default remote), replacing what it held except the files `keep`."""
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        fetched = Path(scratch) / "out"
        reason = fetch_at(root, ref, output, fetched)
        if reason is not None:
            raise VlkdError(f"cannot fetch {output} as {ref} recorded it ({reason}); `dvc pull` its data, or "
                            f"empty {folder} (keeping README.md) to start fresh")
        clear_folder(folder, keep)
        for path in fetched.iterdir():
            shutil.move(str(path), folder / path.name)


def fetch_at(root: Path, ref: str, path: str, target: Path) -> str | None:
    """Copy the DVC-tracked `path` (an output, or a file inside one) as the commit `ref` recorded it to
    `target` (`dvc get . <path> --rev <ref>`: from the cache, else the default remote). None when it did;
    otherwise DVC's reason, in one line."""
    done = subprocess.run([sys.executable, "-m", "dvc", "get", ".", path, "--rev", ref, "-o", str(target)],
                          cwd=root, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    errors = [line for line in (done.stderr + done.stdout).splitlines() if line.startswith("ERROR")]
    return errors[-1].removeprefix("ERROR:").strip() if errors else f"exit status {done.returncode}"


def recorded_param(root: Path, ref: str, section: str, key: str) -> object | None:
    """params.yaml's `section.key` as committed at `ref`; None where the commit has no such value (or no
    readable params.yaml)."""
    import yaml

    from vlkd.config import PARAMS_FILE

    done = git(root, "show", f"{ref}:{PARAMS_FILE}", check=False)
    try:
        params = yaml.safe_load(done.stdout) if done.returncode == 0 else None
    except yaml.YAMLError:
        return None
    values = params.get(section) if isinstance(params, dict) else None
    return values.get(key) if isinstance(values, dict) else None


def clear_folder(folder: Path, keep: Iterable[str] = ("README.md",)) -> None:
    """Remove everything in `folder` (created if missing) but the files named in `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = set(keep)
    for path in folder.iterdir():
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
