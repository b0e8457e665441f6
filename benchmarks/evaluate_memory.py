"""Evaluation memory: image features held once per image against a features tensor stacked per question.

    .venv/bin/python benchmarks/evaluate_memory.py [--images 200] [--questions-per-image 5] [--scale 10]
                                                   [--batch-size 64] [--threads N]

VQAv2 val has 214k questions on 40.5k images (~5 per image). `vlkd evaluate` used to build, for every
VQA condition, a tensor with one row per question (torch.stack over the questions: the image and the
shuffled conditions; an expanded view for the blank one), which with patch tokens is hundreds of GB on
VQAv2. It now holds each image's features once ([images + 1, ...], the blank image last) and every
condition as a row index per question, and gathers one batch at a time. This measures both on the
same images with 1x and `--scale`x the questions:

  per image     `vlkd.evaluate.run.evaluate` as it is;
  per question  the same evaluation with the conditions built as the old code built them. That code is
                gone, so `stacked_per_question_conditions` below reproduces its stacking and is put in
                place of `run._vqa_conditions`; the model gets the same batches, so the predictions of
                both are compared and must be identical.

The benchmark is VQAv2-format files in a temporary folder: `--images` PNG images and questions /
annotations JSON. The teacher is an open_clip ViT with ViT-B/32's image tokens (224 px, 32 px patches:
49 tokens x 768 wide) but 2 layers and random weights, so its tokens are realistic in size and it is
quick to run; the student and its language model are random tiny BARTs (d_model 32), as in the tests.
The images are embedded once, in the parent, into the evaluation's feature cache; each case then runs
`evaluate` (direct VQA mode, greedy search) in its own process, so its peak RSS is its own. Nothing here
contacts a network address.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model and tokenizer here is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TEACHER_MODEL = "vlkd-bench-vit-b32-tokens"
# ViT-B/32's image tower at 224 px (7 x 7 patches of width 768), cut to 2 layers: the feature tensors of
# the real teacher, at a fraction of its cost. The text tower only has to exist.
TEACHER_CONFIG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 768, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "diamond", "star"]
QUESTION_TYPES = [  # (question type, answer type, question, answers to draw from)
    ("what color is the", "other", "What color is the {shape}?", COLOURS),
    ("what shape is the", "other", "What shape is the {colour} object?", SHAPES),
    ("how many", "number", "How many {shape}s are there?", ["1", "2", "3", "4"]),
    ("is there a", "yes/no", "Is there a {colour} {shape}?", ["yes", "no"]),
]


# -- inputs, made in the parent process --------------------------------------------------------------------
def write_images(folder: Path, count: int) -> None:
    """`count` distinct 64 x 64 PNGs named as BenchmarkSpec's image_pattern below expects."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id in range(count):
        pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{image_id:06d}.png")


def write_vqa_files(folder: Path, images: int, per_image: int) -> tuple[Path, Path]:
    """VQAv2-format questions and annotations: `per_image` questions on each of `images` images."""
    import numpy as np

    rng = np.random.default_rng(per_image)
    info = {"description": "vlkd evaluate memory benchmark", "version": "1"}
    questions, annotations = [], []
    for image_id in range(images):
        for k in range(per_image):
            question_id = image_id * per_image + k
            question_type, answer_type, template, answers = QUESTION_TYPES[question_id % len(QUESTION_TYPES)]
            text = template.format(shape=rng.choice(SHAPES), colour=rng.choice(COLOURS))
            humans = [str(rng.choice(answers)) for _ in range(10)]
            questions.append({"image_id": image_id, "question": text, "question_id": question_id})
            annotations.append({"question_id": question_id, "image_id": image_id, "question_type": question_type,
                                "answer_type": answer_type, "multiple_choice_answer": humans[0],
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                            for i, a in enumerate(humans)]})
    folder.mkdir(parents=True)
    questions_file, annotations_file = folder / "questions.json", folder / "annotations.json"
    questions_file.write_text(json.dumps({"info": info, "task_type": "Open-Ended", "data_type": "benchmark",
                                          "data_subtype": "val", "questions": questions}))
    annotations_file.write_text(json.dumps({"info": info, "data_type": "benchmark", "data_subtype": "val",
                                            "annotations": annotations}))
    return questions_file, annotations_file


def make_teacher(folder: Path):
    """The random-weight ViT saved as the teacher stage saves a checkpoint, with its manifest."""
    import open_clip
    import torch

    from vlkd.models.teacher import MANIFEST, SOURCE_FILE, load_teacher, save_checkpoint

    folder.mkdir(parents=True)
    (folder / f"{TEACHER_MODEL}.json").write_text(json.dumps(TEACHER_CONFIG))
    open_clip.add_model_config(folder / f"{TEACHER_MODEL}.json")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(open_clip.create_model(TEACHER_MODEL), TEACHER_MODEL, TEACHER_CONFIG, folder)
    (folder / MANIFEST).write_text(json.dumps({"model": TEACHER_MODEL, "pretrained": str(checkpoint),
                                               "source": SOURCE_FILE}))
    return load_teacher(TEACHER_MODEL, str(checkpoint), image_tokens=True)


def make_models(folder: Path, teacher, texts: list[str]) -> tuple[Path, Path]:
    """(language model, student): a byte-level BPE tokenizer trained on `texts`, a random tiny BART, and a
    `prefix: patch` student of it for the teacher's 768-wide tokens."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    from vlkd.models.student import Student, StudentConfig

    plm = folder / "plm"
    plm.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(plm))
    (plm / "tokenizer_config.json").write_text('{"tokenizer_class": "BartTokenizer"}')
    tokenizer = AutoTokenizer.from_pretrained(plm)
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0)
    BartForConditionalGeneration(config).save_pretrained(plm)
    tokenizer.save_pretrained(plm)
    student = folder / "student"
    width = TEACHER_CONFIG["vision_cfg"]["width"]
    Student(BartForConditionalGeneration.from_pretrained(plm), tokenizer,
            StudentConfig(teacher=teacher.fingerprint.as_dict(), embed_dim=teacher.embed_dim, prefix="patch",
                          visual_width=width)).save_pretrained(student)
    return plm, student


def prepare(args, tmp: Path) -> dict:
    """Images, question files for each scale, models, and the images' features in the evaluation cache."""
    from vlkd.config import BenchmarkSpec
    from vlkd.evaluate.images import image_features

    write_images(tmp / "images", args.images)
    files = {scale: write_vqa_files(tmp / f"vqa-{scale}x", args.images, args.questions_per_image * scale)
             for scale in (1, args.scale)}
    teacher = make_teacher(tmp / "teacher")
    texts = [q["question"] for q in json.loads(files[1][0].read_text())["questions"]]
    plm, student = make_models(tmp, teacher, texts)
    print(f"embedding {args.images} images ...", flush=True)
    spec = BenchmarkSpec(task="vqa", images=tmp / "images", image_pattern="{image_id:06d}.png",
                         questions=files[1][0], annotations=files[1][1])
    features, _ = image_features(spec, list(range(args.images)), teacher, tmp / "cache" / "vqa", patch=True,
                                 device="cpu")
    return {"tmp": str(tmp), "plm": str(plm), "student": str(student), "teacher": str(tmp / "teacher"),
            "batch_size": args.batch_size, "threads": args.threads, "images": args.images,
            "feature_shape": list(features[0].shape),
            "files": {str(scale): [str(q), str(a)] for scale, (q, a) in files.items()}}


# -- one measurement, in its own process ------------------------------------------------------------------
def stacked_per_question_conditions(table, row_of: dict[int, int], usable: list[dict], other: dict[int, int]):
    """The VQA conditions as `vlkd evaluate` built them before (reproduced here, as that code is gone): a
    tensor with a row per question, torch.stack over the questions, for the image and the shuffled
    conditions, and the blank image's features expanded to one row per question. Rows are taken in order
    (row i for question i), so the generator gets the batches the old code sliced off these tensors."""
    import torch

    from vlkd.inference import answering

    if not usable:
        return dict.fromkeys(("image", "blank", "shuffled", "text_only"))
    blank = table[-1]
    own = torch.stack([table[row_of[r["image_id"]]] for r in usable])
    shuffled = torch.stack([table[row_of[other[r["image_id"]]]] if other[r["image_id"]] in row_of else blank
                            for r in usable])
    in_order = torch.arange(len(usable))
    return {"image": answering.FeatureRows(own, in_order),
            "blank": answering.FeatureRows(blank.expand(len(usable), *blank.shape), in_order),
            "shuffled": answering.FeatureRows(shuffled, in_order), "text_only": None}


def run_case(spec: dict) -> dict:
    import open_clip
    import torch

    from vlkd.config import BenchmarkSpec, EvaluateParams
    from vlkd.evaluate import run

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    tmp = Path(spec["tmp"])
    open_clip.add_model_config(tmp / "teacher" / f"{TEACHER_MODEL}.json")
    if spec["case"] == "per question":
        run._vqa_conditions = stacked_per_question_conditions
    questions, annotations = (Path(p) for p in spec["files"][str(spec["scale"])])
    benchmark = BenchmarkSpec(task="vqa", images=tmp / "images", image_pattern="{image_id:06d}.png",
                              questions=questions, annotations=annotations)
    output = tmp / "eval" / f"{spec['case'].replace(' ', '-')}-{spec['scale']}x"
    params = EvaluateParams(student=Path(spec["student"]), plm=Path(spec["plm"]), teacher=Path(spec["teacher"]),
                            output=output, cache=tmp / "cache", benchmarks={"vqa": benchmark}, curves=tmp / "no-curves",
                            vqa_modes=["direct"], num_beams=1, vqa_max_new_tokens=2, batch_size=spec["batch_size"],
                            report_samples=2, device="cpu")
    started = time.perf_counter()
    metrics = run.evaluate(params)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "questions": metrics["vqa"]["questions"], "output": str(output)}


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork + exec,
    so a child would report at least the parent's peak (here: whatever embedding the images used)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def measure(spec: dict) -> dict:
    """Run one case in a fresh process; its peak RSS is its own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_measure", json.dumps(spec)]
    # In the temporary folder, where the default (project-relative) held-out text for text retention is
    # absent: retention is skipped, as it is not what is measured here.
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=spec["tmp"])
    if result.returncode != 0:
        sys.exit(f"{spec['case']} {spec['scale']}x measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def same_predictions(first: dict, second: dict) -> bool:
    """Every predictions file of two evaluations byte for byte the same."""
    a, b = Path(first["output"]) / "vqa", Path(second["output"]) / "vqa"
    names = sorted(path.name for path in a.glob("predictions*.json"))
    return names == sorted(path.name for path in b.glob("predictions*.json")) and all(
        (a / name).read_bytes() == (b / name).read_bytes() for name in names)


# -- main --------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--questions-per-image", type=int, default=5, help="at 1x (VQAv2 val has ~5.3)")
    parser.add_argument("--scale", type=int, default=10, help="the larger question set, as a multiple of 1x")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args._measure:
        result = run_case(json.loads(args._measure))
        print(json.dumps({**result, "rss_mib": peak_rss_mib()}))
        return
    with tempfile.TemporaryDirectory(prefix="vlkd-bench-evaluate-") as tmp:
        spec = prepare(args, Path(tmp))
        results = {}
        for scale in (1, args.scale):
            for case in ("per image", "per question"):
                print(f"evaluating: {case}, {scale}x questions ...", flush=True)
                results[case, scale] = measure({**spec, "case": case, "scale": scale})
        identical = {scale: same_predictions(results["per image", scale], results["per question", scale])
                     for scale in (1, args.scale)}
    tokens, width = spec["feature_shape"]
    print(f"\nevaluation memory, {args.images} images with {tokens} x {width} image tokens each (float32), "
          f"direct VQA mode, batch {args.batch_size}, {platform.machine()} with {os.cpu_count()} CPU cores, "
          f"{args.threads or 'default'} torch threads\n")
    print("| case | questions | images | peak RSS MiB | seconds |")
    print("|---|---:|---:|---:|---:|")
    for (case, scale), r in results.items():
        name = "features per image, gathered per batch" if case == "per image" else \
            "features stacked per question (old, reproduced)"
        print(f"| {name}, {scale}x | {r['questions']} | {args.images} | {r['rss_mib']:.0f} | {r['seconds']:.1f} |")
    for scale in (1, args.scale):
        print(f"\n{scale}x: per question / per image peak RSS "
              f"{results['per question', scale]['rss_mib'] / results['per image', scale]['rss_mib']:.2f}x; "
              f"predictions {'identical' if identical[scale] else 'DIFFERENT'}")
    if not all(identical.values()):
        sys.exit("the two ways of holding the features gave different predictions")


if __name__ == "__main__":
    main()
