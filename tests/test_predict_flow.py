"""The batch-prediction flow (flows/predict.py) through Prefect's test harness, on a tiny real model: a folder
of PNGs and one corrupt file in, one row per file out, the answers `VlkdModel.answer` gives, the model's
identity on every row, progress and summary artifacts; the last promoted model found from its git tag,
fetched once into a folder named by the tag and its DVC hash and reused; the prediction deployment.

The model is a student made on a tiny BART with fresh projections (no distillation: the flow's contract
does not depend on what the student learnt), packaged by hand as `vlkd package` packages one (student/,
teacher/, plm/, vlkd-model.json). Its BART's cross-attention is drawn large, so that its answers depend on
the image and an answer written to the wrong row would show. The promoted-model tests commit a dvc.lock by
hand and stand in for `dvc get` (its own behaviour is tested with the refresh flow in test_flows.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TEST_MODEL, make_random_teacher, make_tiny_plm, png_bytes

from vlkd.errors import VlkdError
from vlkd.inference.asking import Asking
from vlkd.inference.identity import MODEL_RECORD
from vlkd.inference.model import load_model

PROJECT = Path(__file__).resolve().parents[1]
if str(PROJECT) not in sys.path:  # flows/ is a folder of the project, not an installed package
    sys.path.insert(0, str(PROJECT))

QUESTION = "What color is the circle?"
ASKING = Asking(vqa_prompt="Question: {question} Answer: <mask>", caption_prompt="there is <mask>",
                describe_prompt="there is <mask>", num_beams=2, vqa_max_new_tokens=3, caption_max_new_tokens=4,
                batch_size=4)
IMAGES = 5
# what a student records of a language model `vlkd plm` made (vlkd.distill.start.plm_manifest)
PLM_IDENTITY = {"name": "tiny-bart", "sha256": {"model.safetensors": "9" * 64}, "source": "made for the test"}


# ---------------------------------------------------------------------------------------------------
# Fixtures: one Prefect test server, a packaged tiny model, a folder of images with a corrupt one
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def prefect(prefect_server):
    """Every test of this module runs against conftest's Prefect test server."""


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Path:
    """A packaged model folder as `vlkd package` lays one out: student/, teacher/, plm/ and vlkd-model.json
    with how the model is asked, its VQA modes and its identity (the one load_model gives the parts)."""
    from vlkd.models.student import Student, StudentConfig
    from vlkd.models.teacher import CHECKPOINT_NAME, MANIFEST, load_teacher

    parts = tmp_path_factory.mktemp("parts")
    checkpoint = make_random_teacher(parts / "teacher")
    # a teacher folder whose checkpoint is named relative to its manifest, so the folder can be copied
    (parts / "teacher" / MANIFEST).write_text(json.dumps({"model": TEST_MODEL, "pretrained": CHECKPOINT_NAME,
                                                          "source": "trained for the test"}))
    teacher = load_teacher(TEST_MODEL, str(checkpoint))
    texts = [f"there is a {colour} {shape}" for colour in ("red", "green", "blue") for shape in ("circle", "square")]
    plm = attentive(make_tiny_plm(parts / "plm", texts + [f"Question: {QUESTION} Answer: red"]))
    config = StudentConfig(teacher=teacher.fingerprint.as_dict(), embed_dim=teacher.embed_dim,
                           visual_width=teacher.embed_dim, plm=PLM_IDENTITY)
    Student.from_language_model(plm, config).save_pretrained(parts / "student")
    identity = load_model(parts / "student", teacher=parts / "teacher", plm=plm, asking=ASKING).identity
    folder = tmp_path_factory.mktemp("model") / "model"
    for part in ("student", "teacher", "plm"):
        shutil.copytree(parts / part, folder / part)
    (folder / MODEL_RECORD).write_text(json.dumps({"asking": ASKING.as_dict(), "vqa_modes": ["direct", "describe"],
                                                   "identity": identity}))
    return folder


def attentive(plm: Path) -> Path:
    """The BART in `plm` with its decoder's cross-attention drawn at std 0.5 instead of 0.02: at init it
    hardly reads the encoder, so every image would get the same answer."""
    import torch
    from transformers import BartForConditionalGeneration

    bart = BartForConditionalGeneration.from_pretrained(plm)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in bart.named_parameters():
            if "encoder_attn" in name and weight.dim() == 2:
                weight.normal_(0, 0.5)
    bart.save_pretrained(plm)
    return plm


@pytest.fixture(scope="module")
def model(packaged):
    return load_model(packaged)


def image_folder(folder: Path) -> Path:
    """IMAGES distinct PNGs (one in a subfolder) and one file that only claims to be a PNG."""
    (folder / "more").mkdir(parents=True)
    for index in range(IMAGES):
        (folder / ("more" if index == IMAGES - 1 else "") / f"{index:02d}.png").write_bytes(png_bytes(index))
    (folder / "broken.png").write_bytes(b"not an image at all")
    return folder


def artifact(key: str, state):
    """The artifact `key` of the flow run `state` ended."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert len(found) == 1, f"the flow run made {len(found)} artifacts {key!r}, not one"
    return found[0]


# ---------------------------------------------------------------------------------------------------
# The flow on a model folder
# ---------------------------------------------------------------------------------------------------
def test_flow_writes_a_row_per_image_with_the_models_answers_and_identity(packaged, model, tmp_path):
    from flows.predict import PROGRESS_ARTIFACT, SUMMARY_ARTIFACT, batch_predict

    images = image_folder(tmp_path / "images")
    state = batch_predict(source=str(images), question=QUESTION, model=str(packaged), chunk_size=2,
                          return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    label = model.identity["student_sha256"][:12]
    output = images / f"predictions-{label}.parquet"  # beside the source, named after the model
    assert result["output"] == str(output) and result["promoted_tag"] is None
    rows = {row["id"]: row for row in pq.read_table(output).to_pylist()}
    files = sorted(path.relative_to(images).as_posix() for path in images.rglob("*.png"))
    assert sorted(rows) == files  # one row per file, the corrupt one too
    broken = rows.pop("broken.png")
    assert broken["answer"] is None and broken["error"]
    assert all(row["error"] is None for row in rows.values())
    assert (result["rows"], result["answered"], result["not_decoded"]) == (IMAGES + 1, IMAGES, 1)
    assert json.loads(Path(f"{output}.summary.json").read_text())["rows"] == IMAGES + 1
    teacher = model.identity["teacher"]
    assert {row["student_sha256"] for row in rows.values()} == {model.identity["student_sha256"]}
    assert {row["teacher"] for row in rows.values()} == {f"{teacher['model']}@{teacher['weights_sha256'][:12]}"}
    assert {row["mode"] for row in rows.values()} == {"direct"}  # the packaged model's headline mode
    names = sorted(rows)
    expected = model.answer([images / name for name in names], [QUESTION] * len(names))
    assert len(set(expected)) > 1, "the test model answers every image alike: a row's answer would prove nothing"
    assert [rows[name]["answer"] for name in names] == expected
    progress = artifact(PROGRESS_ARTIFACT, state)
    assert float(progress.data) == 100.0 and f"{IMAGES + 1} of {IMAGES + 1} rows" in progress.description
    summary = artifact(SUMMARY_ARTIFACT, state).data
    assert f"| {IMAGES + 1} | {IMAGES} | 1 |" in summary
    assert model.identity["student_sha256"] in summary and str(output) in summary
    assert "`tiny-bart`, model.safetensors `999999999999`" in summary


def test_no_promoted_model_and_no_model_is_one_line_and_exit_2(tmp_path, capsys):
    from flows.predict import main

    project = tiny_project(tmp_path / "project")
    images = image_folder(tmp_path / "images")
    code = main([str(images), "--question", QUESTION, "--params", str(project / "params.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("vlkd: error: no model has been promoted") and "--model" in err


# ---------------------------------------------------------------------------------------------------
# The last promoted model: found from its tag, fetched once into a folder named by tag and hash
# ---------------------------------------------------------------------------------------------------
def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout


def tiny_project(root: Path) -> Path:
    """A git repository that find_project takes for a project: params.yaml (package.output) and dvc.yaml."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text("package:\n  output: data/model\n")
    (root / "dvc.yaml").write_text("stages: {}\n")
    git(root, "init", "--quiet")
    git(root, "add", "-A")
    git(root, "commit", "--quiet", "-m", "init")
    return root


def promote_package(root: Path, tag: str, md5: str) -> None:
    """Commit a dvc.lock whose package stage recorded data/model with `md5`, and tag the commit."""
    (root / "dvc.lock").write_text(f"schema: '2.0'\nstages:\n  package:\n    cmd: vlkd package\n    outs:\n"
                                   f"    - path: data/model\n      hash: md5\n      md5: {md5}.dir\n")
    git(root, "add", "dvc.lock")
    git(root, "commit", "--quiet", "-m", f"promote {tag}")
    git(root, "tag", tag)


@pytest.fixture
def fake_dvc_get(packaged, monkeypatch) -> list[tuple[str, str]]:
    """`dvc get` replaced by a copy of the packaged model; the (tag, path) of each call."""
    import flows.predict

    calls = []

    def fetch_at(root: Path, ref: str, path: str, target: Path) -> str | None:
        calls.append((ref, path))
        shutil.copytree(packaged, target)
        return None

    monkeypatch.setattr(flows.predict, "fetch_at", fetch_at)
    return calls


def test_a_promoted_model_is_fetched_once_into_a_folder_named_by_tag_and_hash(tmp_path, fake_dvc_get):
    from flows.predict import MODELS_FOLDER, packaged_output_at, promoted_model_folder

    project = tiny_project(tmp_path / "project")
    promote_package(project, "promoted/v1", "a" * 32)
    output, md5 = packaged_output_at(project, "promoted/v1", project / "data/model")
    assert (output, md5) == ("data/model", "a" * 32)
    folder, fetched = promoted_model_folder(project, "promoted/v1", output, md5)
    assert folder == project / MODELS_FOLDER / f"promoted-v1-{'a' * 12}" and fetched
    assert (folder / MODEL_RECORD).is_file()
    assert promoted_model_folder(project, "promoted/v1", output, md5) == (folder, False)  # reused, not fetched
    promote_package(project, "promoted/v2", "b" * 32)  # a model promoted later lands in a folder of its own
    later, fetched = promoted_model_folder(project, "promoted/v2", *packaged_output_at(project, "promoted/v2",
                                                                                       project / "data/model"))
    assert later.name == f"promoted-v2-{'b' * 12}" and fetched and folder.is_dir()
    assert fake_dvc_get == [("promoted/v1", "data/model"), ("promoted/v2", "data/model")]
    assert not [path for path in later.parent.iterdir() if path.name.startswith(".")]  # no scratch left


def test_a_tag_without_the_package_stage_and_a_failed_fetch_are_one_clear_error(tmp_path, monkeypatch):
    import flows.predict
    from flows.predict import MODELS_FOLDER, packaged_output_at, promoted_model_folder

    project = tiny_project(tmp_path / "project")
    git(project, "tag", "promoted/v1")  # promoted before the package stage existed: no data/model in dvc.lock
    with pytest.raises(VlkdError, match="promoted/v1 recorded no packaged model"):
        packaged_output_at(project, "promoted/v1", project / "data/model")
    monkeypatch.setattr(flows.predict, "fetch_at", lambda *args: "missing cache files")
    with pytest.raises(VlkdError, match=r"cannot fetch data/model as promoted/v1 recorded it \(missing cache"):
        promoted_model_folder(project, "promoted/v1", "data/model", "c" * 32)
    assert not any((project / MODELS_FOLDER).iterdir())  # nothing that passes for a fetched model


def test_flow_without_a_model_uses_the_last_promoted_one(packaged, model, tmp_path, fake_dvc_get):
    from flows.predict import MODELS_FOLDER, batch_predict

    project = tiny_project(tmp_path / "project")
    promote_package(project, "promoted/v1", "d" * 32)
    promote_package(project, "promoted/v2", "e" * 32)
    requests = tmp_path / "requests.jsonl"  # a file of requests: the output goes beside it
    image_folder(tmp_path / "images")
    requests.write_text("".join(json.dumps({"image": f"images/{i:02d}.png", "question": QUESTION}) + "\n"
                                for i in range(2)))
    result = batch_predict(source=str(requests), params_file=str(project / "params.yaml"))
    assert result["promoted_tag"] == "promoted/v2"
    assert result["model_folder"] == str(project / MODELS_FOLDER / f"promoted-v2-{'e' * 12}")
    assert result["output"] == str(tmp_path / "requests.predictions-promoted-v2.parquet")
    assert result["rows"] == result["answered"] == 2
    again = batch_predict(source=str(requests), task="caption", params_file=str(project / "params.yaml"))
    assert again["model_folder"] == result["model_folder"]
    assert fake_dvc_get == [("promoted/v2", "data/model")]  # fetched once, reused by the second run


# ---------------------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------------------
def test_prediction_deployment_by_hand_or_on_its_own_cron(tmp_path):
    from flows.serve import PREDICT, prediction_deployment

    project = tiny_project(tmp_path / "project")
    params = str(project / "params.yaml")
    by_hand = prediction_deployment(params)
    assert by_hand.name == PREDICT and not by_hand.schedules
    assert by_hand.parameters == {"params_file": params, "task": "vqa"}
    nightly = prediction_deployment(params, source=str(tmp_path / "incoming"), question=QUESTION, cron="0 4 * * *")
    schedule = nightly.schedules[0].schedule
    assert schedule.cron == "0 4 * * *" and schedule.timezone == "UTC"  # pipeline.schedule's timezone
    assert nightly.parameters["source"] == str(tmp_path / "incoming") and nightly.parameters["question"] == QUESTION
    with pytest.raises(VlkdError, match="needs a source"):
        prediction_deployment(params, cron="0 4 * * *")
    with pytest.raises(VlkdError, match="--predict-cron"):
        prediction_deployment(params, source=str(tmp_path), cron="every night")
