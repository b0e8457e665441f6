"""`dvc repro` of the real dvc.yaml in a temporary git repo at a tiny size: the first run builds every
stage, a rerun changes nothing, a params change re-runs only the stages that depend on it.

The tests run the pipeline up to TARGET (as `dvc repro TARGET`), so stages appended to dvc.yaml later
are not run here; the tiny params cover every section anyway. test_flows.py builds its projects with
make_tiny_project too.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
TARGET = "features"
# TARGET and what it depends on, in dvc.yaml's order (the flow's); `dvc repro` runs them in an order of its
# own choosing among those its graph allows (the world's teacher needs only the world), so its runs are
# compared as sets
UPSTREAM = ["synth", "download", "teacher", "features"]
SKIP = ("metrics/", "dvc.lock", ".ci/", "dvclive/")  # data/: only git's files (READMEs) are listed

# Every stage at a size that runs in seconds on 2 CPU cores (sections a stage does not have yet are
# left out by tiny_params).
TINY = {
    "synth": {"images": 40, "eval_images": 8, "shifted_images": 4, "text_scenes": 50, "pretrain_images": 40,
              "image_size": 48},
    "download": {"shard_size": 20, "processes": 1, "threads": 4},
    "teacher": {"epochs": 1, "batch_size": 16, "warmup_steps": 1, "device": "cpu"},
    "features": {"batch_size": 32, "num_workers": 0, "device": "cpu"},
    # a teacher trained for one epoch (or a random one) puts every pair at about the same score and every
    # image at a cosine near 1 to every other: no CLIP-score rule and no semantic dedup (tests/test_filter.py)
    "filter": {"clip_score_null_quantile": None, "semdedup_clusters": None},
    "plm": {"vocab_size": 300, "d_model": 32, "layers": 1, "heads": 2, "ffn_dim": 64, "max_length": 32,
            "epochs": 1, "batch_size": 16, "warmup_steps": 1, "device": "cpu"},
    "distill": {"epochs": 1, "batch_size": 8, "warmup_steps": 1, "device": "cpu"},
    "evaluate": {"num_beams": 1, "batch_size": 8, "report_samples": 2, "vqa_max_new_tokens": 3,
                 "caption_max_new_tokens": 5, "device": "cpu"},
    "vlm": {"vocab_size": 200, "image_size": 32, "patch_size": 8, "hidden": 32, "layers": 1, "heads": 2,
            "ffn_dim": 64, "epochs": 1, "batch_size": 8, "warmup_steps": 1, "device": "cpu"},
    "finetune": {"fractions": [0.5, 1.0], "seeds": [0], "variants": ["none", "clip-td"], "ablations": [],
                 "epochs": 1, "min_steps": 2, "batch_size": 8, "device": "cpu"},
    "pipeline": {"lock_timeout": 5, "retries": 1, "retry_delay_seconds": 0},
}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def project_files() -> list[str]:
    """The project's files as a fresh clone would have them (plus files not yet committed)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT, check=True,
                            capture_output=True, text=True).stdout.splitlines()
    return [name for name in listed if not name.startswith(SKIP) and (PROJECT / name).is_file()]


def tiny_overrides(**sections) -> dict:
    """TINY (and `sections`) as overrides of the project's params.yaml, for the sections it has."""
    from vlkd.orchestrate.params import flatten

    present = yaml.safe_load((PROJECT / "params.yaml").read_text())
    chosen = {name: values for name, values in TINY.items() if name in present}
    for name, values in sections.items():
        chosen[name] = {**chosen.get(name, {}), **values}
    return {"synth.port": free_port(), **flatten(chosen)}  # a port in `sections` wins


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd=root,
                          check=True, capture_output=True, text=True).stdout


def make_tiny_project(root: Path, **sections) -> Path:
    """A copy of the project (no data, no lock) with tiny params, as a git repo with one commit."""
    for name in project_files():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / name, target)
    from vlkd.orchestrate.params import apply_overrides

    apply_overrides(root, tiny_overrides(**sections))  # edits the copy of params.yaml, comments kept
    git(root, "init", "--quiet")
    git(root, "add", "-A")
    git(root, "commit", "--quiet", "-m", "tiny project")
    return root


def dvc_env() -> dict[str, str]:
    """DVC runs each stage's `vlkd ...` command: this interpreter's bin folder goes first on PATH."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def dvc(root: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=dvc_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def skipped(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.endswith("didn't change, skipping")]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """(project, output of the first `dvc repro TARGET`)."""
    root = make_tiny_project(tmp_path_factory.mktemp("dvc") / "project")
    return root, dvc(root, "repro", TARGET)


def test_first_run_builds_every_stage_and_records_it(first_run):
    root, output = first_run
    assert sorted(ran(output)) == sorted(UPSTREAM) and ran(output)[0] == "synth" and ran(output)[-1] == TARGET
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(UPSTREAM) <= set(lock["stages"])
    download = json.loads((root / "metrics/download.json").read_text())
    assert download["url_list"]["successes"] == 40 and download["shards"]["count"] == 2
    features = json.loads((root / "metrics/features.json").read_text())
    assert features["images"] == 40 and features["shards"]["total"] == 2
    assert json.loads((root / "metrics/runs/features.json").read_text())["shards_computed"] == 2
    assert (root / "data/teacher/manifest.json").is_file()
    assert "up to date" in dvc(root, "status", TARGET)


def test_rerun_with_nothing_changed_runs_no_stage(first_run):
    root, _ = first_run
    before = (root / "dvc.lock").read_text()
    output = dvc(root, "repro", TARGET)
    assert ran(output) == [] and sorted(skipped(output)) == sorted(UPSTREAM)
    assert (root / "dvc.lock").read_text() == before


def test_params_change_reruns_only_the_stages_that_depend_on_it(first_run):
    root, _ = first_run
    from vlkd.orchestrate.params import apply_overrides

    lock_before = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    text_before = (root / "params.yaml").read_text()
    assert apply_overrides(root, {"features.batch_size": 16}) == {"features.batch_size": (32, 16)}
    diff = difflib.ndiff(text_before.splitlines(), (root / "params.yaml").read_text().splitlines())
    edited = [line[2:].split("#")[0].strip() for line in diff if line.startswith(("+ ", "- "))]
    assert edited == ["batch_size: 32", "batch_size: 16"]  # one line edited, comments and layout kept
    output = dvc(root, "repro", TARGET)
    assert ran(output) == ["features"]
    assert sorted(skipped(output)) == ["download", "synth", "teacher"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert all(lock[name] == lock_before[name] for name in ("synth", "download", "teacher"))
    assert lock["features"]["params"]["params.yaml"]["features"]["batch_size"] == 16
    # an encoding setting is in each feature file's record: every file is made again (batched kernels may
    # round differently), and the stages after it see new features
    assert json.loads((root / "metrics/runs/features.json").read_text())["shards_computed"] == 2


def test_a_grown_corpus_leaves_the_worlds_teacher_as_it_was(first_run):
    """The world's teacher pretrains on its own pairs, which a bigger corpus does not change: DVC skips it,
    and features embeds only the new shard."""
    root, _ = first_run
    from vlkd.orchestrate.params import apply_overrides

    teacher_before = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["teacher"]
    apply_overrides(root, {"synth.images": 60})
    output = dvc(root, "repro", TARGET)
    assert sorted(ran(output)) == ["download", "features", "synth"] and skipped(output) == ["teacher"]
    assert yaml.safe_load((root / "dvc.lock").read_text())["stages"]["teacher"] == teacher_before
    features = json.loads((root / "metrics/runs/features.json").read_text())
    assert (features["shards_computed"], features["shards_skipped"]) == (1, 2)
