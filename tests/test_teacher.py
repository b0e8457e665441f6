"""The teacher stage on a tiny real world: train the embedded open_clip model, save, load, check, skip."""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from vlkd.config import TeacherParams
from vlkd.data.webdataset import iter_shard, list_shards
from vlkd.errors import VlkdError
from vlkd.io import sha256_file
from vlkd.models.teacher import (
    CHECKPOINT_NAME,
    EMBEDDED_CONFIG,
    EMBEDDED_MODEL,
    MANIFEST,
    load_teacher,
    resolve_teacher,
)
from vlkd.teacher import build, contrastive
from vlkd.teacher.build import METRICS, build_teacher
from vlkd.teacher.contrastive import train_contrastive
from vlkd.teacher.retrieval import _recalls

# The embedded ResNet itself (vlkd-tiny-resnet, open_clip's ModifiedResNet) at the side the world's run
# trains it at (params.yaml), on the tiny world: its own code path, a few seconds per training.
IMAGE_SIZE = 64
EPOCHS = 20


def teacher_params(world: Path, shards: Path, output: Path, **overrides) -> TeacherParams:
    settings = {"model": "vlkd-tiny-resnet", "pretrained": None, "output": output, "shards": shards,
                "eval_images": world / "images" / "eval", "image_size": IMAGE_SIZE,
                "eval_captions": world / "captions" / "annotations.json", "epochs": EPOCHS, "batch_size": 10,
                "lr": 1e-3, "warmup_steps": 3, "seed": 0, "device": "cpu"}
    return TeacherParams(**{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(tiny_world_shards, tmp_path_factory):
    """(params, manifest) of one teacher trained by the stage."""
    world, shards = tiny_world_shards
    params = teacher_params(world, shards, tmp_path_factory.mktemp("stage") / "teacher")
    return params, build_teacher(params)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def probe_inputs(image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, image_size, image_size, generator=generator)
    tokens = open_clip.get_tokenizer(EMBEDDED_MODEL)(["a red circle on the left", "a small blue square", "two"])
    return images, tokens


@torch.no_grad()
def embeddings(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    images, tokens = probe_inputs()
    model.eval()
    return model.encode_image(images), model.encode_text(tokens)


def test_checkpoint_loads_through_open_clip_and_load_teacher(trained, tmp_path):
    params, manifest = trained
    folder = Path(params.output)
    checkpoint = folder / CHECKPOINT_NAME
    assert manifest["pretrained"] == CHECKPOINT_NAME and checkpoint.is_file()
    assert resolve_teacher(folder) == (EMBEDDED_MODEL, str(checkpoint.resolve()))

    open_clip.add_model_config(folder / f"{EMBEDDED_MODEL}.json")
    by_open_clip, _, _ = open_clip.create_model_and_transforms(EMBEDDED_MODEL, pretrained=str(checkpoint))
    by_load_teacher = load_teacher(*resolve_teacher(folder)).model
    assert isinstance(by_load_teacher.visual, open_clip.modified_resnet.ModifiedResNet)  # the embedded ResNet
    # The same training again, kept in memory: the stage saved exactly these weights.
    in_memory, _ = train_contrastive(params, tmp_path, save=False)
    expected = embeddings(in_memory)
    for loaded in (by_open_clip, by_load_teacher):
        state, want_state = loaded.state_dict(), in_memory.state_dict()
        assert state.keys() == want_state.keys()
        assert all(torch.equal(state[name], want_state[name]) for name in state)
        # A frozen model (requires_grad off) may take PyTorch's fused attention path: equal up to rounding.
        for got, want in zip(embeddings(loaded), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_manifest_and_metrics(trained):
    params, manifest = trained
    folder = Path(params.output)
    assert read_json(folder / MANIFEST) == manifest
    assert manifest["weights_sha256"] == sha256_file(folder / CHECKPOINT_NAME)
    assert manifest["model"] == EMBEDDED_MODEL
    assert manifest["source"] == f"trained on {params.shards}"
    assert manifest["open_clip_version"] == open_clip.__version__
    assert manifest["embed_dim"] == EMBEDDED_CONFIG["embed_dim"]
    assert manifest["image_size"] == IMAGE_SIZE
    assert manifest["params"] == params.model_dump(mode="json")
    assert manifest["inputs"]["shards"] == {tar.name: sha256_file(tar) for tar in list_shards(params.shards)}
    vision = {**EMBEDDED_CONFIG["vision_cfg"], "image_size": IMAGE_SIZE}
    assert manifest["training_setup"]["model_config"] == {**EMBEDDED_CONFIG, "vision_cfg": vision}

    metrics = read_json(folder / METRICS)
    retrieval = metrics["retrieval"]
    # The tiny world's 6 eval images have 5 captions each, all 30 texts distinct. Chance, a random ranking:
    # image->text, k of the 30 texts hold one of the image's 5; text->image, k of the 6 images hold its own.
    assert (retrieval["images"], retrieval["texts"]) == (6, 30)
    chance = {"image_to_text": {1: 5 / 30, 5: 1 - math.comb(25, 5) / math.comb(30, 5)},
              "text_to_image": {1: 1 / 6, 5: 5 / 6}}
    for direction, levels in chance.items():
        for k, level in levels.items():
            assert retrieval[direction][f"chance@{k}"] == round(level, 4), (direction, k)
        # Trained, the teacher ranks an image's own captions (a caption's own image) first more often than
        # chance does (20 epochs here: 5/6 image->text, 12-13/30 text->image).
        assert retrieval[direction]["recall@1"] > levels[1], (direction, retrieval[direction])
        assert retrieval[direction]["recall@5"] >= retrieval[direction]["recall@1"]
    training = metrics["training"]
    assert training["train_images"] == 30 and training["bad_samples"] == {"count": 0, "keys": []}
    assert training["images_seen"] == params.epochs * 30  # 3 full batches of 10 per epoch
    assert training["steps"] == params.epochs * 3
    assert len(training["loss_per_epoch"]) == params.epochs


def test_training_lowers_the_contrastive_loss(trained):
    params, _ = trained
    training = read_json(Path(params.output) / METRICS)["training"]
    # Each image has 3 captions, one drawn per epoch; chance (uniform) is log(batch) = 2.30.
    assert training["loss_last_epoch"] < training["loss_first_epoch"] - 0.2
    assert training["loss_last_epoch"] < math.log(params.batch_size)


def test_same_seed_same_weights_other_seed_other_weights(trained, tmp_path):
    """Two epochs (past the warmup) suffice; the full training's weights are reproduced by the tests that
    retrain the module's teacher (test_checkpoint_loads..., test_changed_weights_are_not_trusted)."""
    params = trained[0].model_copy(update={"epochs": 2})
    first = build_teacher(params.model_copy(update={"output": tmp_path / "first"}))
    again = build_teacher(params.model_copy(update={"output": tmp_path / "again"}))
    assert again["weights_sha256"] == first["weights_sha256"]
    other = build_teacher(params.model_copy(update={"output": tmp_path / "other", "seed": 1}))
    assert other["weights_sha256"] != first["weights_sha256"]


def test_image_size_sets_the_embedded_models_input_side(trained, tmp_path):
    params, _ = trained
    manifest = build_teacher(params.model_copy(update={"output": tmp_path / "t96", "image_size": 96, "epochs": 1}))
    assert manifest["image_size"] == 96
    assert manifest["training_setup"]["model_config"]["vision_cfg"]["image_size"] == 96
    teacher = load_teacher(EMBEDDED_MODEL, str(tmp_path / "t96" / CHECKPOINT_NAME))
    assert teacher.preprocess(Image.new("RGB", (64, 64))).shape == (3, 96, 96)


def test_rerun_with_the_same_params_is_skipped(trained):
    params, manifest = trained
    checkpoint = Path(params.output) / CHECKPOINT_NAME
    before = checkpoint.stat().st_mtime_ns, (Path(params.output) / METRICS).read_bytes()
    assert build_teacher(params) == manifest
    assert (checkpoint.stat().st_mtime_ns, (Path(params.output) / METRICS).read_bytes()) == before


def test_changed_weights_are_not_trusted(tiny_world_shards, trained, tmp_path):
    params, manifest = trained
    copy = tmp_path / "teacher"
    shutil.copytree(params.output, copy)
    moved = params.model_copy(update={"output": copy})
    with (copy / CHECKPOINT_NAME).open("ab") as file:
        file.write(b"\0")
    rebuilt = build_teacher(moved)
    assert rebuilt["weights_sha256"] == manifest["weights_sha256"] == sha256_file(copy / CHECKPOINT_NAME)


def corrupt_one_image(shards: Path) -> str:
    """Replace the first image of the second shard with garbage, in place; returns its key."""
    tar_path = list_shards(shards)[1]
    with tarfile.open(tar_path) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    victim = next(member.name for member, _ in members if member.name.endswith(".jpg"))
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members:
            data = b"this is not a jpeg" * 5 if member.name == victim else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return victim.split(".")[0]


def test_a_corrupt_image_is_counted_and_skipped_and_changed_shards_retrain(tiny_world_shards, tmp_path):
    world, shards = tiny_world_shards
    shutil.copytree(shards, tmp_path / "shards")
    params = teacher_params(world, tmp_path / "shards", tmp_path / "teacher", epochs=1)
    clean = build_teacher(params)
    key = corrupt_one_image(tmp_path / "shards")
    assert key in {sample.key for tar in list_shards(tmp_path / "shards") for sample in iter_shard(tar)}
    rebuilt = build_teacher(params)  # same params, different shard contents: not skipped
    assert rebuilt["inputs"]["shards"] != clean["inputs"]["shards"]
    training = read_json(tmp_path / "teacher" / METRICS)["training"]
    assert training["bad_samples"] == {"count": 1, "keys": [key]}
    assert training["train_images"] == 29


def test_train_shards_keep_the_teacher_when_a_refresh_adds_shards(tiny_world_shards, tmp_path, monkeypatch):
    world, shards = tiny_world_shards
    for tar in list_shards(shards)[:2]:  # a corpus of two shards, the third one arrives with a refresh
        for part in tar.parent.glob(f"{tar.stem}*"):
            shutil.copy2(part, tmp_path / part.name)
    params = teacher_params(world, tmp_path, tmp_path / "teacher", epochs=1, train_shards=2)
    first = build_teacher(params)
    assert sorted(first["inputs"]["shards"]) == ["00000.tar", "00001.tar"]
    for part in shards.glob("00002*"):
        shutil.copy2(part, tmp_path / part.name)
    assert len(list_shards(tmp_path)) == 3
    monkeypatch.setattr(build, "train_contrastive", lambda *args, **kwargs: pytest.fail("retrained the teacher"))
    assert build_teacher(params) == first  # the new shard is not a training shard
    monkeypatch.undo()
    everything = build_teacher(params.model_copy(update={"train_shards": None}))
    assert sorted(everything["inputs"]["shards"]) == ["00000.tar", "00001.tar", "00002.tar"]


def test_a_checkpoint_file_is_used_as_it_is(tiny_world_shards, trained, tmp_path):
    world, _ = tiny_world_shards
    params, manifest = trained
    checkpoint = Path(params.output) / CHECKPOINT_NAME
    use = params.model_copy(update={"output": tmp_path / "given", "pretrained": str(checkpoint),
                                    "shards": tmp_path / "no-shards-needed",
                                    "eval_captions": tmp_path / "missing.json"})
    given = build_teacher(use)
    assert given["source"] == "checkpoint file"
    assert given["weights_sha256"] == manifest["weights_sha256"]
    assert not (tmp_path / "given" / CHECKPOINT_NAME).exists()
    assert resolve_teacher(tmp_path / "given") == (EMBEDDED_MODEL, str(checkpoint.resolve()))
    assert "missing.json" in read_json(tmp_path / "given" / METRICS)["retrieval"]["skipped"]


def test_a_checkpoint_file_in_the_project_is_recorded_relative_to_it(tiny_world_shards, trained, tmp_path):
    """The manifest names the file relative to the project (so the same project elsewhere records the
    same bytes), and the file is still found and checked from any working directory."""
    params, manifest = trained
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "params.yaml").write_text("{}\n")
    checkpoint = project / "models" / CHECKPOINT_NAME
    shutil.copy(Path(params.output) / CHECKPOINT_NAME, checkpoint)
    use = params.model_copy(update={"output": project / "data" / "teacher", "pretrained": str(checkpoint),
                                    "eval_captions": tmp_path / "missing.json"})
    build_teacher(use)
    recorded = read_json(project / "data" / "teacher" / "manifest.json")
    assert recorded["pretrained"] == "models/" + CHECKPOINT_NAME
    assert recorded["params"]["output"] == "data/teacher"
    assert resolve_teacher(project / "data" / "teacher") == (EMBEDDED_MODEL, str(checkpoint.resolve()))
    assert build_teacher(use) == recorded  # up to date: the relative record matches the same params


def test_a_checkpoint_of_another_model_is_refused(trained, tmp_path):
    params, _ = trained
    checkpoint = str(Path(params.output) / CHECKPOINT_NAME)
    with pytest.raises(VlkdError, match="does not match"):
        build_teacher(params.model_copy(update={"output": tmp_path / "a", "model": "ViT-B-32",
                                                "pretrained": checkpoint}))
    with pytest.raises(VlkdError, match="unknown open_clip model"):
        build_teacher(params.model_copy(update={"output": tmp_path / "b", "model": "no-such-model",
                                                "pretrained": checkpoint}))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resolve_teacher_without_a_teacher(tmp_path):
    with pytest.raises(VlkdError, match="run `vlkd teacher` first"):
        resolve_teacher(tmp_path / "nothing-here")


def test_missing_training_shards_name_the_param_and_both_ways_to_make_them(tiny_world_shards, tmp_path):
    world, _ = tiny_world_shards
    with pytest.raises(VlkdError, match=r"teacher.shards .*pretrain does not exist.*synth.pretrain_images above 0"
                                        r".*`vlkd download`"):
        build_teacher(teacher_params(world, tmp_path / "pretrain", tmp_path / "teacher"))
    assert not (tmp_path / "teacher").exists()


def test_refuses_to_replace_a_folder_that_is_not_a_teacher(tiny_world_shards, tmp_path):
    world, shards = tiny_world_shards
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "precious.txt").write_text("keep me")
    with pytest.raises(VlkdError, match="not a teacher folder"):
        build_teacher(teacher_params(world, shards, tmp_path / "teacher"))
    assert (tmp_path / "teacher" / "precious.txt").read_text() == "keep me"


def test_recall_and_chance_judge_hits_by_text():
    # 2 images, 3 texts; text 1 belongs to both images.
    relevant = torch.tensor([[True, True, False], [False, True, True]])
    similarity = torch.tensor([[0.9, 0.1, 0.75], [0.8, 0.2, 0.7]])
    result = _recalls(similarity, relevant, (1, 2))
    assert result["recall@1"] == 0.5  # image 0 ranks text 0 first (its own); image 1 ranks text 0 (not its own)
    assert result["recall@2"] == 1.0
    assert result["chance@1"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["chance@2"] == 1.0
    by_text = _recalls(similarity.T, relevant.T, (1,))
    assert by_text["recall@1"] == pytest.approx(2 / 3, abs=1e-4)  # text 2 ranks image 0 first: a miss
    assert by_text["chance@1"] == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3, abs=1e-4)


def test_an_image_with_several_captions_is_paired_with_each_of_them():
    image = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image, format="PNG")
    tokenizer = open_clip.get_tokenizer("RN50")
    captions = [("a red square", "a square on the left", "a red shape"), ("a blue circle",)]
    pairs = contrastive._Pairs([image.getvalue()] * 2, captions, tokenizer, lambda picture: torch.zeros(1))
    torch.manual_seed(0)
    drawn = {tuple(pairs[0][1].tolist()) for _ in range(60)}
    assert drawn == {tuple(tokens.tolist()) for tokens in tokenizer(list(captions[0]))}
    assert all(torch.equal(pairs[1][1], tokenizer(["a blue circle"])[0]) for _ in range(5))
