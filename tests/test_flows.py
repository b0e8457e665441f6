"""The Prefect flows through Prefect's test harness, on tiny copies of the project in temporary git repos:
the pipeline flow (every stage as a task, DVC deciding, push, artifacts), a no-op rerun, refreshes that
add rows (only new rows downloaded, only new shards embedded) and promote, a gate that rejects a worse
model, a failing stage, the workspace lock; and the library under the flows (gate, lock, overrides,
redaction) directly.

Each flow test works on its own copy of a template project (nothing run, built, or built and promoted),
so none depends on what another test did to a workspace, its tags or its metrics, and any one runs alone
or in any order. Artifacts are read from the test's own flow run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from test_dvc_pipeline import PROJECT, TARGET, UPSTREAM, dvc, make_tiny_project

from vlkd.config import GateMetric, load_params
from vlkd.errors import VlkdError
from vlkd.orchestrate.gate import compare
from vlkd.orchestrate.lock import WorkspaceLock
from vlkd.orchestrate.params import apply_overrides, parse_assignments
from vlkd.orchestrate.process import Redactor, secret_values, stream

if str(PROJECT) not in sys.path:  # flows/ is a folder of the project, not an installed package
    sys.path.insert(0, str(PROJECT))

GATE = [{"file": "metrics/download.json", "metric": "url_list.successes"},
        {"file": "metrics/teacher.json", "metric": "retrieval.image_to_text.recall@1", "tolerance": 1.0}]


# ---------------------------------------------------------------------------------------------------
# Fixtures: one Prefect test server; template projects, each flow test on its own copy of one
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def prefect(prefect_server):
    """Every test of this module runs against conftest's Prefect test server."""


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """Template: a tiny project with nothing run yet, whose teacher is a fixed checkpoint (no training), so
    a refresh that adds shards keeps the teacher and the features stage embeds only the new shards."""
    from conftest import TEST_MODEL, make_random_teacher

    root = tmp_path_factory.mktemp("flows-fresh") / "project"
    checkpoint = make_random_teacher(root.parent / "checkpoint")
    return make_tiny_project(root, teacher={"model": TEST_MODEL, "pretrained": str(checkpoint)},
                             pipeline={"gate": GATE})


@pytest.fixture(scope="module")
def first_run(prefect, fresh, tmp_path_factory):
    """Template: a copy of `fresh` after the pipeline flow's first run up to TARGET (pushed to the remote
    beside it); (project, the flow run's state)."""
    from flows.pipeline import pipeline

    root = workspace(fresh, tmp_path_factory.mktemp("flows-built"))
    state = pipeline(params_file=str(root / "params.yaml"), until=TARGET, return_state=True)
    assert state.is_completed(), state.message
    return root, state


@pytest.fixture(scope="module")
def promoted(first_run, tmp_path_factory) -> Path:
    """Template: a copy of `first_run`'s project with its model promoted as promoted/v1 (by the library, as
    the refresh flow promotes: the files it records, committed and tagged)."""
    from flows.refresh import record_paths
    from vlkd.orchestrate.promote import promote
    from vlkd.orchestrate.stages import list_stages

    root = workspace(first_run[0], tmp_path_factory.mktemp("flows-promoted"))
    prefix = load_params(root / "params.yaml").pipeline.tag_prefix
    promote(root, prefix, record_paths(root, list_stages(root)), "Promote the first model")
    assert tags(root) == ["promoted/v1"]
    return root


def workspace(template: Path, folder: Path) -> Path:
    """A copy of a template project in `folder`: its git history and tags, its DVC cache, its data, and the
    DVC remote beside it (the project's remote is `../vlkd-remote`)."""
    root = folder / "project"
    shutil.copytree(template, root, symlinks=True)
    if (template.parent / "vlkd-remote").is_dir():
        shutil.copytree(template.parent / "vlkd-remote", folder / "vlkd-remote", symlinks=True)
    return root


def read(root: Path, name: str) -> dict:
    return json.loads((root / name).read_text())


def tags(root: Path) -> list[str]:
    return subprocess.run(["git", "tag", "--list"], cwd=root, capture_output=True, text=True).stdout.split()


def artifact(key: str, state):
    """The artifact `key` of the flow run `state` ended (not the latest of that key, which another run may
    have made)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert len(found) == 1, f"the flow run made {len(found)} artifacts {key!r}, not one"
    return found[0]


def task_runs(state) -> dict[str, int]:
    """{task run name: run count} of a flow run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {run.name: run.run_count for run in runs}


# ---------------------------------------------------------------------------------------------------
# The pipeline flow
# ---------------------------------------------------------------------------------------------------
def test_pipeline_flow_runs_each_stage_as_a_task_pushes_and_publishes(first_run):
    from flows.pipeline import METRICS_ARTIFACT, RUN_ARTIFACT

    project, state = first_run  # the flow's first run on a project where nothing had run
    result = state.result()
    assert [run["stage"] for run in result["stages"]] == UPSTREAM
    assert result["ran"] == UPSTREAM
    assert set(task_runs(state)) == {*UPSTREAM, *(name for name in task_runs(state) if name.startswith("dvc push"))}
    assert set(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) >= set(UPSTREAM)
    assert "up to date" in dvc(project, "status", TARGET)
    # pushed to the default remote, a folder beside the project
    assert any((project.parent / "vlkd-remote").rglob("*")), "dvc push wrote nothing to the local remote"
    assert "Everything is up to date" in dvc(project, "push")
    metrics = artifact(METRICS_ARTIFACT, state)
    rows = metrics.data if isinstance(metrics.data, list) else json.loads(metrics.data)
    assert {"file": "metrics/download.json", "metric": "url_list.successes", "value": 40} in rows
    summary = artifact(RUN_ARTIFACT, state).data
    assert "features" in summary and "report.html" in summary


def test_second_run_with_nothing_changed_reruns_no_stage(first_run, tmp_path):
    from flows.pipeline import pipeline

    project = workspace(first_run[0], tmp_path)
    lock = (project / "dvc.lock").read_text()
    result = pipeline(params_file=str(project / "params.yaml"), until=TARGET)
    assert result["ran"] == []
    assert {run["status"] for run in result["stages"]} == {"skipped"}
    assert (project / "dvc.lock").read_text() == lock


# ---------------------------------------------------------------------------------------------------
# Refresh, gate and promotion
# ---------------------------------------------------------------------------------------------------
def test_first_refresh_promotes_the_current_model(first_run, tmp_path):
    from flows.refresh import refresh

    project = workspace(first_run[0], tmp_path)  # built, nothing promoted
    assert tags(project) == []
    result = refresh(params_file=str(project / "params.yaml"), until=TARGET)
    assert result["ran"] == [] and result["gate_passed"] and result["baseline"] is None
    assert result["promoted"] == "promoted/v1" and tags(project) == ["promoted/v1"]
    committed = subprocess.run(["git", "show", "promoted/v1:dvc.lock"], cwd=project, capture_output=True,
                               text=True, check=True).stdout
    assert committed == (project / "dvc.lock").read_text()
    again = refresh(params_file=str(project / "params.yaml"), until=TARGET)  # nothing new: no new tag
    assert again["gate_passed"] and again["promoted"] is None and again["current"] == "promoted/v1"
    assert tags(project) == ["promoted/v1"]


def test_refresh_with_new_rows_downloads_and_embeds_only_them_and_promotes(promoted, tmp_path):
    from flows.refresh import GATE_ARTIFACT, refresh

    project = workspace(promoted, tmp_path)  # 40 images in 2 shards, promoted as promoted/v1
    # A new version of the URL list: the same world with 20 more images (the first 40 rows are the same).
    state = refresh(params_file=str(project / "params.yaml"), overrides={"synth.images": 60}, until=TARGET,
                    return_state=True)
    result = state.result()
    download = read(project, "metrics/runs/download.json")  # the run log: what this run did
    assert download["fetched"] == 20 and download["new_shards"] == [2]
    assert read(project, "metrics/download.json")["url_list"]["successes"] == 60
    features = read(project, "metrics/runs/features.json")
    assert features["shards_computed"] == 1 and features["shards_skipped"] == 2
    assert result["gate_passed"] and result["baseline"] == "promoted/v1" and result["promoted"] == "promoted/v2"
    assert tags(project) == ["promoted/v1", "promoted/v2"]
    gate = {row["metric"]: row for row in result["gate"]}
    assert gate["url_list.successes (metrics/download.json)"]["promoted"] == 40
    assert gate["url_list.successes (metrics/download.json)"]["new"] == 60
    summary = artifact(f"{GATE_ARTIFACT}-summary", state).data
    assert "Promoted" in summary
    # the comparison with promoted/v1: every metric (gated first), and one line for what it cannot compare
    assert result["comparison"] == str(project / "reports" / "refresh" / "comparison.html")
    comparison = read(project, "reports/refresh/comparison.json")
    assert comparison["baseline"] == "promoted/v1"
    rows = {(row["file"], row["metric"]): row for row in comparison["metrics"]}
    assert comparison["metrics"][0]["metric"] == "url_list.successes" and comparison["metrics"][0]["gated"]
    assert rows["metrics/download.json", "url_list.successes"]["change"] == 20
    images = rows["metrics/features.json", "images"]
    assert (images["promoted"], images["new"], images["verdict"]) == (40, 60, None)  # not gated: no verdict
    assert comparison["answers"] == {}  # the flow ran up to the features: no evaluation to compare
    assert "this run has no evaluation (data/eval does not exist): no answers to compare" in comparison["notes"]
    assert "| url_list.successes | metrics/download.json | 40 | 60 | +20 |" in summary
    assert result["comparison"] in summary


def test_refresh_continues_distillation_from_the_promoted_student_on_the_new_rows(fresh, tmp_path):
    from flows.refresh import refresh

    project = workspace(fresh, tmp_path)
    first = refresh(params_file=str(project / "params.yaml"), until="distill")  # nothing promoted: a full run
    assert first["promoted"] == "promoted/v1"
    alone = read(project, "reports/refresh/comparison.json")
    assert alone["baseline"] is None and alone["notes"][0] == "nothing promoted yet: this run is shown alone"
    kept = read(project, "metrics/filter.json")["kept"]
    assert read(project, "metrics/distill.json")["trained_rows"] == {"new": kept, "replayed": 0}
    v1 = (project / "data" / "student" / "model.safetensors").read_bytes()
    v1_steps = read(project, "metrics/distill.json")["steps"]

    result = refresh(params_file=str(project / "params.yaml"), overrides={"synth.images": 60, "distill.replay": 0.5},
                     until="distill")
    assert result["promoted"] == "promoted/v2"
    assert (project / "data" / "promoted" / "model.safetensors").read_bytes() == v1  # v1's student, from DVC
    assert (project / "data" / "promoted" / "README.md").is_file()
    # The filter saw only the new shard, against every row it kept before; distillation trains on the new
    # shard's kept rows and replays half as many kept rows of the others.
    assert read(project, "metrics/runs/filter.json")["files_filtered"] == 1
    new = read(project, "metrics/filter.json")["kept"] - kept
    distilled = read(project, "metrics/distill.json")
    assert distilled["trained_rows"] == {"new": new, "replayed": round(new / 2)}
    assert distilled["init"] == "data/promoted"
    assert distilled["steps"] == (new + round(new / 2)) // 8  # one epoch over the new and replayed rows, batch 8
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert "data/promoted" in {dep["path"] for dep in lock["stages"]["distill"]["deps"]}
    # the comparison draws both runs' curves: v1's from its tag, this run's from the workspace
    curves = {curve["name"]: curve for curve in read(project, "reports/refresh/comparison.json")["curves"]}
    assert (len(curves["train/loss"]["promoted"]), len(curves["train/loss"]["new"])) == (v1_steps, distilled["steps"])
    assert "<polyline" in (project / "reports" / "refresh" / "comparison.html").read_text()


def test_gate_rejects_a_worse_model_and_the_promoted_one_can_be_restored(promoted, tmp_path):
    import pyarrow.parquet as pq

    from flows.refresh import GATE_ARTIFACT, refresh

    project = workspace(promoted, tmp_path)  # 40 successes, promoted as promoted/v1
    # A new list that lost half of its rows: fewer successes than the promoted model had.
    shrunk = project / "lists" / "shrunk.parquet"
    shrunk.parent.mkdir()
    pq.write_table(pq.read_table(project / "data/world/urls.parquet").slice(0, 20), shrunk)
    promoted_lock = subprocess.run(["git", "show", "promoted/v1:dvc.lock"], cwd=project, capture_output=True,
                                   text=True, check=True).stdout
    # (only as far as the download stage, whose metrics fail the gate: the later stages cost time here)
    state = refresh(url_list=str(shrunk), params_file=str(project / "params.yaml"), until="download",
                    return_state=True)
    result = state.result()
    assert result["ran"] == ["download"]
    assert not result["gate_passed"] and result["promoted"] is None and result["current"] == "promoted/v1"
    assert "url_list.successes 40 -> 20" in result["gate_summary"]
    assert tags(project) == ["promoted/v1"]
    assert "Not promoted" in artifact(f"{GATE_ARTIFACT}-summary", state).data
    assert (project / "dvc.lock").read_text() != promoted_lock
    # the command the flow gives brings the promoted model back (git for the lock, DVC for the data)
    assert result["restore"].startswith("git checkout promoted/v1 -- ")
    subprocess.run(result["restore"], shell=True, cwd=project, check=True, capture_output=True,
                   env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    assert (project / "dvc.lock").read_text() == promoted_lock
    assert "up to date" in dvc(project, "status", TARGET)
    assert read(project, "metrics/download.json")["url_list"]["successes"] == 40


def test_stage_failure_keeps_earlier_outputs_and_the_promoted_model(promoted, tmp_path):
    from flows.pipeline import pipeline

    project = workspace(promoted, tmp_path)
    lock_before = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    teacher_manifest = (project / "data/teacher/manifest.json").read_text()
    shards = {p.name: p.stat().st_mtime_ns for p in (project / "data/shards").iterdir()}
    state = pipeline(params_file=str(project / "params.yaml"), overrides={"teacher.pretrained": "missing.safetensors"},
                     until=TARGET, return_state=True)
    assert state.is_failed()
    assert "does not exist" in str(state.result(raise_on_failure=False))
    runs = task_runs(state)
    assert runs["teacher"] == 1, "bad input must not be retried"
    assert "features" not in runs
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert lock == lock_before  # nothing recorded for the failed stage; earlier stages as they were
    assert {p.name: p.stat().st_mtime_ns for p in (project / "data/shards").iterdir()} == shards
    # DVC removed the teacher's outputs before running it; the flow put the last good ones back
    assert (project / "data/teacher/manifest.json").read_text() == teacher_manifest
    assert (project / "metrics/teacher.json").is_file()
    assert tags(project) == ["promoted/v1"]


def test_a_second_run_on_the_same_workspace_stops_with_a_clear_message(fresh, tmp_path):
    from flows.pipeline import pipeline

    project = workspace(fresh, tmp_path)
    params_before = (project / "params.yaml").read_text()
    with WorkspaceLock(project, owner="a run in this test"):
        state = pipeline(params_file=str(project / "params.yaml"), overrides={"pipeline.lock_timeout": 0.5,
                                                                              "teacher.epochs": 3},
                         until=TARGET, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "another pipeline run holds" in message and f"pid {os.getpid()}" in message
    assert "a run in this test" in message
    assert (project / "params.yaml").read_text() == params_before  # it touched nothing
    assert not (project / "dvc.lock").exists()  # and ran nothing


# ---------------------------------------------------------------------------------------------------
# The library under the flows
# ---------------------------------------------------------------------------------------------------
def test_lock_waits_for_the_holder_then_runs(tmp_path):
    first = WorkspaceLock(tmp_path, owner="first")
    first.acquire()
    released = threading.Event()

    def release() -> None:
        released.set()  # before the release: the second holder can only get in after it
        first.release()

    threading.Timer(0.5, release).start()
    with WorkspaceLock(tmp_path, timeout=10, owner="second"):
        assert released.is_set(), "the second run got the lock while the first still held it"
    with WorkspaceLock(tmp_path, timeout=0):  # free again
        pass


def test_lock_timeout_names_the_holder(tmp_path):
    with WorkspaceLock(tmp_path, owner="nightly run"), pytest.raises(VlkdError) as err:
        WorkspaceLock(tmp_path, timeout=0.3).acquire()
    assert "nightly run" in str(err.value) and "lock_timeout" in str(err.value)


def spec(metric: str, **kwargs) -> GateMetric:
    return GateMetric(metric=metric, file="m.json", **kwargs)


def test_gate_rejects_worse_beyond_tolerance_only():
    before = {"m.json": {"vqa": {"overall": 50.0}, "loss": 1.0, "cider": 0.80}}
    gate = [spec("vqa.overall", tolerance=1.0), spec("loss", higher_is_better=False),
            spec("cider", relative_tolerance=0.05)]
    within = compare(before, {"m.json": {"vqa": {"overall": 49.2}, "loss": 0.9, "cider": 0.77}}, gate, baseline="v1")
    assert within.passed, within.rows()
    assert [check.verdict for check in within.checks] == ["within tolerance", "better", "within tolerance"]
    worse = compare(before, {"m.json": {"vqa": {"overall": 48.0}, "loss": 1.2, "cider": 0.70}}, gate, baseline="v1")
    assert not worse.passed
    assert [check.verdict for check in worse.checks] == ["worse", "worse", "worse"]
    assert "vqa.overall 50 -> 48" in worse.summary()


def test_gate_missing_and_new_metrics():
    gate = [spec("a"), spec("b")]
    report = compare({"m.json": {"a": 1.0}}, {"m.json": {"b": 2.0}}, gate, baseline="v3")
    assert [check.verdict for check in report.checks] == ["missing", "new"]
    assert not report.passed and "a is missing" in report.summary()
    first = compare(None, {"m.json": {"a": 1.0, "b": 2.0}}, gate)
    assert first.passed and "first" in first.summary()
    unchecked = compare(None, {"m.json": {"b": 2.0}}, gate)
    assert not unchecked.passed and unchecked.summary() == "a is missing from the new m.json"


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    assert parse_assignments(["teacher.epochs=2", "teacher.pretrained=null", "x.y=[a, b]"]) == {
        "teacher.epochs": 2, "teacher.pretrained": None, "x.y": ["a", "b"]}
    with pytest.raises(VlkdError, match="key=value"):
        parse_assignments(["teacher.epochs"])
    (tmp_path / "params.yaml").write_text((PROJECT / "params.yaml").read_text())
    with pytest.raises(VlkdError, match="teacher.epochs"):
        apply_overrides(tmp_path, {"teacher.epochs": 0})
    with pytest.raises(VlkdError, match="teacher.nonsense"):
        apply_overrides(tmp_path, {"teacher.nonsense": 1})
    assert (tmp_path / "params.yaml").read_text() == (PROJECT / "params.yaml").read_text()


def test_streamed_output_never_shows_credentials(tmp_path):
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-K7MDENG", "DB_PASSWORD": "hunter2-hunter2"}
    script = ("import os, sys\n"
              "print('key', os.environ['AWS_SECRET_ACCESS_KEY'])\n"
              "print('remote s3://AKIAEXAMPLE:topsecret@bucket/path and https://user:pw@host/x')\n"
              "sys.stderr.write('pw ' + os.environ['DB_PASSWORD'] + ' block-value-123\\n')\n"
              "for i in range(3): sys.stderr.write(f'\\r{i}/3 progress')\n"
              "sys.stderr.write('\\n')\n")
    lines: list[str] = []
    done = stream([sys.executable, "-c", script], tmp_path, lines.append, env=env,
                  redact=Redactor([*secret_values(env), "block-value-123"]))
    text = "\n".join(lines)
    assert done.returncode == 0
    for secret in ("wJalrXUtnFEMI-K7MDENG", "hunter2-hunter2", "topsecret", "AKIAEXAMPLE", "user:pw",
                   "block-value-123"):
        assert secret not in text
    assert "s3://***@bucket/path" in text and "key ***" in text
    assert "2/3 progress" in text


def test_secret_blocks_reach_the_stage_environment_but_not_the_logs():
    from prefect.blocks.system import Secret

    from flows.pipeline import stage_environment

    Secret(value="sk-test-value-42").save("vlkd-test-token", overwrite=True)
    env, redact = stage_environment({"VLKD_REMOTE_TOKEN": "vlkd-test-token"})
    assert env["VLKD_REMOTE_TOKEN"] == "sk-test-value-42"
    assert redact("token sk-test-value-42") == "token ***"
    with pytest.raises(VlkdError, match="no Prefect Secret block"):
        stage_environment({"X_TOKEN": "no-such-block"})


def test_serve_builds_the_scheduled_deployment_from_params(fresh, tmp_path):
    from flows.serve import MANUAL, RETRAIN, deployments

    project = workspace(fresh, tmp_path)
    retrain, manual = deployments(str(project / "params.yaml"))
    assert (retrain.name, manual.name) == (RETRAIN, MANUAL)
    schedule = retrain.schedules[0].schedule
    assert schedule.cron == "0 3 * * 1" and schedule.timezone == "UTC"
    assert retrain.parameters["params_file"] == str(project / "params.yaml")
    assert not manual.schedules


def test_only_transient_stage_failures_are_retried():
    from prefect.states import Failed

    from flows.pipeline import _transient
    from vlkd.orchestrate.process import Completed
    from vlkd.orchestrate.stages import failure

    bad_input = failure("teacher", Completed(255, ["> vlkd teacher", "vlkd: error: checkpoint x does not exist",
                                                   "ERROR: failed to reproduce 'teacher': ..., exited with 2"]))
    crashed = failure("distill", Completed(255, ["Killed",
                                                 "ERROR: failed to reproduce 'distill': ..., exited with -9"]))
    dvc_lock = failure("features", Completed(255, ["ERROR: Unable to acquire lock. Most likely another DVC process "
                                                   "is running or was terminated abruptly."]))
    no_output = failure("distill", Completed(255, ["ERROR: failed to reproduce 'distill': output "
                                                   "'metrics/distill/plots/metrics' does not exist"]))
    assert bad_input.permanent and bad_input.reason == "vlkd: error: checkpoint x does not exist"
    assert not crashed.permanent and not dvc_lock.permanent and "Unable to acquire lock" in dvc_lock.reason
    assert no_output.permanent  # the command succeeded without writing it: running it again writes none either
    assert ([_transient(None, None, Failed(data=err)) for err in (bad_input, crashed, dvc_lock, no_output)]
            == [False, True, True, False])
    assert _transient(None, None, Failed(data=VlkdError("bad params"))) is False


# ---------------------------------------------------------------------------------------------------
# Stages that do not need each other run at the same time
# ---------------------------------------------------------------------------------------------------
# Each branch stage starts, then waits for the other branch to have started: run one after the other,
# the first would wait out its 120 s and fail. `join` needs both.
WAIT_FOR_OTHER = """import pathlib, sys, time
me, other = sys.argv[1:]
pathlib.Path(f"{me}.started").touch()
deadline = time.time() + 120
while not pathlib.Path(f"{other}.started").exists():
    if time.time() > deadline:
        sys.exit(f"{other} never started while {me} ran")
    time.sleep(0.2)
pathlib.Path(f"{me}.out").write_text(me)
"""


def branching_project(root: Path, concurrent_stages: int) -> Path:
    root.mkdir(parents=True)
    (root / "wait.py").write_text(WAIT_FOR_OTHER)
    stages = {name: {"cmd": f"{sys.executable} wait.py {name} {other}", "outs": [f"{name}.out"]}
              for name, other in (("left", "right"), ("right", "left"))}
    stages["join"] = {"cmd": "cat left.out right.out > joined.out", "deps": ["left.out", "right.out"],
                      "outs": ["joined.out"], "metrics": [{"joined.json": {"cache": False}}]}
    stages["join"]["cmd"] += " && echo '{\"joined\": 1}' > joined.json"
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump({"pipeline": {"push": False, "retries": 0, "gate": [],
                                                                   "concurrent_stages": concurrent_stages}}))
    (root / ".gitignore").write_text("*.started\n")
    subprocess.run(["git", "init", "--quiet"], cwd=root, check=True)
    dvc(root, "init", "--quiet")
    return root


def test_stages_that_do_not_need_each_other_run_at_the_same_time(tmp_path):
    from flows.pipeline import pipeline
    from vlkd.orchestrate.stages import plan

    root = branching_project(tmp_path / "project", concurrent_stages=2)
    assert {stage.name: stage.needs for stage in plan(root)} == {"left": (), "right": (), "join": ("left", "right")}
    result = pipeline(params_file=str(root / "params.yaml"))
    assert [item["stage"] for item in result["stages"]] == ["left", "right", "join"]
    assert (root / "joined.out").read_text() == "leftright"
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"left", "right", "join"}  # both branches recorded, neither write lost
