"""The whole flow on a corpus in the public formats, configured by one overlay of the paper's recipe, as a
user with their own data would run it: a headerless Conceptual-Captions-style TSV of URLs served on 127.0.0.1, an
open_clip architecture from a local checkpoint file, a BART folder loaded with `from_pretrained`, and
VQAv2- and COCO-format evaluation files with COCO's file names. Nothing of the synthetic world may be
created or read.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TEST_MODEL, make_random_teacher, make_tiny_plm
from PIL import Image
from test_dvc_pipeline import PROJECT, TINY, make_tiny_project

if str(PROJECT) not in sys.path:  # flows/ is a folder of the project, not an installed package
    sys.path.insert(0, str(PROJECT))

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
TRAIN_ROWS = 40
EVAL_IMAGE_IDS = [42, 73, 139, 285, 632, 724]



def jpeg(colour: tuple[int, int, int], size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_user_data(root: Path, image_server) -> None:
    """The user's files, in the layout configs/cc3m-vitl14-bartlarge.yaml describes."""
    names = list(COLOURS)
    rows = [f"a photo of something {names[i % 4]}\t{image_server.url(f'/img/{i}.png')}" for i in range(TRAIN_ROWS)]
    (root / "data/cc3m").mkdir(parents=True)
    (root / "data/cc3m/Train_GCC-training.tsv").write_text("\n".join(rows) + "\n")  # CC3M has no header

    coco = root / "data/benchmarks/coco"
    colour_of = {image_id: names[k % 4] for k, image_id in enumerate(EVAL_IMAGE_IDS)}
    for image_id, colour in colour_of.items():
        path = coco / "val2014" / f"COCO_val2014_{image_id:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(COLOURS[colour]))
    write_json(coco / "annotations/captions_karpathy_test.json", {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in EVAL_IMAGE_IDS],
        "annotations": [{"id": n, "image_id": i, "caption": f"a photo of something {colour_of[i]}"}
                        for n, i in enumerate(EVAL_IMAGE_IDS)]})
    questions = [{"question_id": i * 10 + q, "image_id": i, "question": text}
                 for i in EVAL_IMAGE_IDS for q, text in enumerate(["What color is it?", "Is there a photo?"])]
    answers = {0: lambda i: colour_of[i], 1: lambda i: "yes"}
    write_json(root / "data/benchmarks/vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
               {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "questions": questions})
    write_json(root / "data/benchmarks/vqav2/v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": q["question_id"], "image_id": q["image_id"],
         "question_type": "what color is the" if q["question_id"] % 10 == 0 else "is there a",
         "answer_type": "other" if q["question_id"] % 10 == 0 else "yes/no",
         "multiple_choice_answer": answers[q["question_id"] % 10](q["image_id"]),
         "answers": [{"answer": answers[q["question_id"] % 10](q["image_id"]), "answer_confidence": "yes",
                      "answer_id": k + 1} for k in range(10)]} for q in questions]})

    (root / "data/text").mkdir(parents=True)
    (root / "data/text/heldout.txt").write_text("\n".join(f"a photo of something {c}" for c in names) + "\n")
    make_random_teacher(root / "data/models/teacher")
    make_tiny_plm(root / "data/models/bart", [row.split("\t")[0] for row in rows] + ["Question: Answer:"])


VARIANT = {
    "download": {"url_list": "data/cc3m/Train_GCC-training.tsv", "input_format": "tsv",
                 "column_names": ["caption", "url"], "captions_col": None, "image_size": 32, "processes": 1,
                 "threads": 4, "shard_size": 20},
    "teacher": {"model": TEST_MODEL, "pretrained": "data/models/teacher/open_clip_model.safetensors",
                "shards": "data/shards",  # as configs/cc3m-vitl14-bartlarge.yaml: not the world's pretraining shards
                "eval_images": "data/benchmarks/coco/val2014",
                "eval_captions": "data/benchmarks/coco/annotations/captions_karpathy_test.json"},
    # Image tokens pooled to a 2 x 2 grid (the way to keep tokens affordable at scale), read by a patch prefix:
    # evaluation must embed its images with the same grid, or the student's teacher check refuses them.
    "features": {"image_tokens": True, "token_grid": 2},
    # The paper's filter, but the test images are 32 px and a random teacher's scores and neighbours mean nothing.
    "filter": {"min_image_side": None, "clip_score_min": None, "semdedup_clusters": None},
    "plm": {"model": "data/models/bart", "text": "data/text", "corpus": None, "heldout": "data/text/heldout.txt"},
    "distill": {"prefix": "patch", "prefix_tokens": 1, "retention_weight": 0.0, "reading_weight": 0.0,
                "whole_caption_share": 0.0,
                "whole_caption_keep": 0, "epochs": 1},
    "evaluate": {"data": "data/benchmarks", "vqa_modes": ["direct"], "benchmarks": {
        "vqav2": {"task": "vqa", "images": "data/benchmarks/coco/val2014",
                  "image_pattern": "COCO_val2014_{image_id:012d}.jpg",
                  "questions": "data/benchmarks/vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
                  "annotations": "data/benchmarks/vqav2/v2_mscoco_val2014_annotations.json"},
        "coco-captions": {"task": "caption", "images": "data/benchmarks/coco/val2014",
                          "image_pattern": "COCO_val2014_{image_id:012d}.jpg",
                          "annotations": "data/benchmarks/coco/annotations/captions_karpathy_test.json"}}},
    # CLIP-TD on the user's VQAv2-format files (here the same small split trains and tests): the embedded ViLT
    # pretrained on the user's shards, then the protocol at one fraction.
    "vlm": {"model": None},
    "finetune": {"data": "data/benchmarks", "fractions": [1.0], "seeds": [0], "variants": ["none", "clip-td"],
                 "ablations": [], "tasks": {"vqav2": {"task": "vqa", **{split: {
                     "images": "data/benchmarks/coco/val2014", "image_pattern": "COCO_val2014_{image_id:012d}.jpg",
                     "questions": "data/benchmarks/vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
                     "annotations": "data/benchmarks/vqav2/v2_mscoco_val2014_annotations.json"}
                     for split in ("train", "test")}}}},
    "pipeline": {"gate": [{"metric": "vqav2.overall"}, {"metric": "coco-captions.CIDEr"}]},
}


def user_overlay() -> dict:
    """The user's file: an overlay of the paper's recipe (nothing of the synthetic world's), at test sizes."""
    tiny = {section: values for section, values in TINY.items() if section != "synth"}
    sections = {name: {**tiny.get(name, {}), **VARIANT.get(name, {})} for name in {*tiny, *VARIANT}}
    return {"base": "configs/cc3m-vitl14-bartlarge.yaml", **sections}


@pytest.fixture(scope="module")
def user_run(tmp_path_factory, prefect_server):
    """(project, flow result) of `python -m flows.pipeline --params configs/my-corpus.yaml`."""
    from conftest import ImageServer

    from flows.pipeline import pipeline

    server = ImageServer()
    server.thread.start()
    try:
        root = make_tiny_project(tmp_path_factory.mktemp("real") / "project")
        write_user_data(root, server)
        variant = root / "configs" / "my-corpus.yaml"
        variant.write_text(yaml.safe_dump(user_overlay(), sort_keys=False))
        result = pipeline(params_file=str(variant))
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    return root, result


def test_a_variant_file_runs_every_stage_on_the_users_corpus_without_the_world(user_run):
    root, result = user_run
    stages = ["download", "teacher", "features", "filter", "plm", "distill", "evaluate", "package", "vlm", "finetune"]
    assert [stage["stage"] for stage in result["stages"]] == stages
    assert result["ran"] == stages
    assert not (root / "data/world").exists()
    lock = (root / "dvc.lock").read_text()
    assert "data/world" not in lock and "synth" not in yaml.safe_load(lock)["stages"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    outside_synth = json.dumps({name: section for name, section in params.items() if name != "synth"})
    assert "data/world" not in outside_synth


def test_the_users_files_are_what_each_stage_read(user_run):
    root, _ = user_run
    download = json.loads((root / "metrics/download.json").read_text())
    assert download["url_list"]["rows"] == TRAIN_ROWS and download["url_list"]["successes"] == TRAIN_ROWS
    teacher = json.loads((root / "data/teacher/manifest.json").read_text())
    assert teacher["model"] == TEST_MODEL
    assert teacher["pretrained"] == "data/models/teacher/open_clip_model.safetensors"
    assert json.loads((root / "metrics/teacher.json").read_text())["retrieval"]["images"] == len(EVAL_IMAGE_IDS)
    assert json.loads((root / "data/plm/vlkd-plm.json").read_text())["name"] == "data/models/bart"
    features = pq.ParquetFile(root / "data/features/00000.parquet")
    assert features.schema_arrow.field("image_tokens").type.list_size == 2 * 2  # the ViT's 4 x 4 patches pooled
    assert json.loads(features.schema_arrow.metadata[b"vlkd.features"])["teacher"]["token_grid"] == 2


def test_evaluation_scores_the_variants_benchmarks_only(user_run):
    root, result = user_run
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert set(metrics) == {"recipe", "vqav2", "coco-captions", "retention"}
    assert metrics["recipe"]["name"] == "VLKD + patch prefix"  # the paper's recipe, with the user's patch prefix
    assert metrics["vqav2"]["questions"] == 2 * len(EVAL_IMAGE_IDS) and metrics["vqav2"]["images_not_decoded"] == 0
    assert metrics["vqav2"]["mode"] == "direct"
    assert metrics["coco-captions"]["images_not_decoded"] == 0
    predictions = json.loads((root / "data/eval/vqav2/predictions.json").read_text())
    assert sorted(p["question_id"] for p in predictions) == sorted(i * 10 + q for i in EVAL_IMAGE_IDS for q in (0, 1))
    assert result["scorecard"] == ["metrics/evaluate.json"]
