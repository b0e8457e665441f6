"""Where the embedded world's VQA accuracy is lost: in the teacher, in the student's descriptions, or in reading them.

    python benchmarks/grounding.py [--params params.yaml] [--images 200] [--prompt "A picture of <mask>"]

Needs a finished pipeline on the embedded world (`make demo` or `dvc repro`): the scene records of
`synth.output`, the stored features, the teacher, the student. Three tables, each against a baseline
measured in the same run:

1. teacher: a linear probe (logistic regression) per attribute on the stored image embeddings of
   single-object training images (80/20 split), against always answering the majority class;
   `objects` (one or two) on every image.
2. descriptions: what the student writes with the describe prompt (what describe-mode VQA reads) for
   evaluation images, parsed with the world's vocabulary: the share of true objects whose colour, shape,
   colour and shape, and colour, shape and position it names, and how often it names as many objects as
   there are; against the descriptions it writes for the blank image (the evaluation's blank control).
3. perfect reader: VQA accuracy (official metric) of answering every question from those descriptions
   by rule, as a language model that never misreads would, and that answers nothing where the
   description says nothing (a language model also guesses from priors, which the blank control
   measures). From the true scenes the reader scores 100, which checks the reader.
4. domain shift by cause: the evaluation images' objects against the shifted images' objects of a seen
   colour-shape pair (only the background is new) and of a held-out pair (the pair is new too), for each
   stage that could lose them: the teacher (zero-shot: the object's true pair among its image's top pairs
   by cos(image, "a {colour} {shape}"); and, on single-object images, linear colour and shape probes fitted
   on the training images' stored embeddings), the student's descriptions (colour and shape named), and the
   recorded evaluation's answers to the questions about that object (a perfect reader of the descriptions,
   then each VQA mode the evaluation scored and describe's blank control), read from `evaluate.output`;
   questions that name no object of the image (counts, absent pairs) in their own row.

This is a diagnostic of the embedded world only (its scene records and vocabulary), not of any model.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from vlkd.config import load_params
from vlkd.data.vqa_metric import question_accuracy, read_json, score_vqa
from vlkd.evaluate.images import image_features
from vlkd.evaluate.run import mode_folder
from vlkd.models.infill import extract_infill, fill_prompt
from vlkd.models.student import Student
from vlkd.models.teacher import load_teacher, resolve_teacher
from vlkd.world.language import POSITION_PHRASES
from vlkd.world.scenes import COLOURS, SHAPES

PROBED = ("colour", "shape", "size", "position")
OBJECT = re.compile(rf"(?:(small|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
                    rf"(?: ({'|'.join(map(re.escape, POSITION_PHRASES.values()))}))?")
POSITION_OF_PHRASE = {phrase: position for position, phrase in POSITION_PHRASES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the project's)")
    parser.add_argument("--images", type=int, default=200, help="evaluation images to describe")
    parser.add_argument("--prompt", default=None, help="the describing prompt (default: evaluate.describe_prompt)")
    args = parser.parse_args()
    torch.manual_seed(0)
    params = load_params(args.params)
    world = params.synth.output
    stored = stored_embeddings(params.distill.features, params.features.shards, world)
    print_table("1. teacher: linear probes on stored image embeddings", ["attribute", "probe", "majority"],
                teacher_probes(*stored))
    prompt = args.prompt or params.evaluate.describe_prompt
    evaluation = describe(params, world, args.images, prompt)
    descriptions, scenes, questions = evaluation
    scores = [description_scores(described, scenes) for described in descriptions]
    print_table("2. student descriptions of evaluation images", ["named right", "image", "blank image"],
                [[name, f"{image:.2f}", f"{blank:.2f}"]
                 for name, image, blank in zip(DESCRIPTION_MEASURES, *scores, strict=True)])
    truth = {image_id: scene_text(scene) for image_id, scene in scenes.items()}
    read = (("student, image", descriptions[0]), ("student, blank image", descriptions[1]), ("true scenes", truth))
    print_table("3. VQA by a perfect reader of the descriptions", ["descriptions", "overall", "per question type"],
                [[name, *read_and_score(questions, described)] for name, described in read])
    print("example descriptions (truth -> student):",
          *[f"  {scene_text(scenes[i])!r} -> {descriptions[0][i]!r}" for i in list(scenes)[:4]], sep="\n")
    modes = params.evaluate.vqa_modes
    print_table("4. domain shift by cause (objects of each kind; VQA on the questions about them)",
                ["objects", "count", "probe colour", "probe shape", "teacher top pairs", "described", "questions",
                 "reader", *[f"VQA {mode}" for mode in modes], "blank"],
                shift_by_cause(params, world, args.images, prompt, stored, evaluation))


def teacher_probes(x: torch.Tensor, records: list[dict]) -> list[list[str]]:
    single = torch.tensor([len(r["objects"]) == 1 for r in records])
    rows = [[name, *probe(x[single], [r["objects"][0][name] for r, s in zip(records, single, strict=True) if s])]
            for name in PROBED]
    return rows + [["objects", *probe(x, [len(r["objects"]) for r in records])]]


def stored_embeddings(features: Path, shards: Path, world: Path) -> tuple[torch.Tensor, list[dict]]:
    """The features stage's normalised image embeddings of the training images, with their scenes."""
    scenes = {s["image_id"]: s for s in map(json.loads, (world / "scenes" / "train.jsonl").open())}
    urls = pq.read_table(world / "urls.parquet", columns=["url"]).column("url").to_pylist()
    image_of_url = {url: int(Path(url).stem) for url in urls}
    key_url = {}
    for path in sorted(glob.glob(str(shards / "0*.parquet"))):  # not failed.parquet
        table = pq.read_table(path, columns=["key", "url"])
        key_url.update(zip(table.column("key").to_pylist(), table.column("url").to_pylist(), strict=True))
    embeddings, records = [], []
    for path in sorted(features.glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "image_embedding"])
        for key, embedding in zip(table.column("key").to_pylist(), table.column("image_embedding").to_pylist(),
                                  strict=True):
            embeddings.append(embedding)
            records.append(scenes[image_of_url[key_url[key]]])
    return torch.nn.functional.normalize(torch.tensor(np.array(embeddings, dtype=np.float32)), dim=1), records


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.nn.Linear:
    """A logistic regression on normalised embeddings (scaled by 10, as CLIP's logit scale would)."""
    layer = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(layer.parameters(), 1e-2)
    for _ in range(500):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(layer(10 * x), y).backward()
        optimizer.step()
    return layer


def probe(x: torch.Tensor, labels: list) -> list[str]:
    """Held-out accuracy of a logistic regression on 80% of the rows, and of the majority class."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    train = torch.arange(len(y)) < int(0.8 * len(y))
    layer = fit_probe(x[train], y[train], len(classes))
    accuracy = (layer(10 * x[~train]).argmax(1) == y[~train]).float().mean().item()
    majority = Counter(y[train].tolist()).most_common(1)[0][0]
    return [f"{accuracy:.3f}", f"{(y[~train] == majority).float().mean().item():.3f}"]


def describe(params, world: Path, count: int, prompt: str, split: str = "eval"):
    """(image descriptions, blank-image descriptions) by image id, the scenes, the VQA questions."""
    spec = params.evaluate.benchmarks[vqa_benchmark(params, split)]
    scenes = {s["image_id"]: s for s in map(json.loads, (world / "scenes" / f"{split}.jsonl").open())}
    image_ids = sorted(scenes)[:count]
    scenes = {i: scenes[i] for i in image_ids}
    student = Student.from_pretrained(params.evaluate.student, "cpu")
    patch = student.config.prefix == "patch"
    teacher = load_teacher(*resolve_teacher(params.evaluate.teacher), device="cpu", image_tokens=patch)
    features, blank = image_features(spec, image_ids, teacher, params.evaluate.cache / f"grounding-{split}", patch,
                                     "cpu")
    prompt = fill_prompt(prompt)
    described = []
    for rows in (torch.stack([features[i] for i in image_ids]), blank.expand(1, *blank.shape)):
        texts = []
        for begin in range(0, len(rows), 64):
            batch = rows[begin:begin + 64]
            texts += student.generate(batch, [prompt] * len(batch), params.evaluate.num_beams,
                                      params.evaluate.caption_max_new_tokens)
        texts = [extract_infill(prompt, text) for text in texts]
        described.append(dict(zip(image_ids, texts if len(texts) == len(image_ids) else texts * len(image_ids),
                                  strict=True)))
    questions = read_json(spec.questions), read_json(spec.annotations)
    return described, scenes, questions


def vqa_benchmark(params, split: str) -> str:
    """The evaluation's VQA benchmark on the world's `split` images (eval or shifted)."""
    return next(name for name, spec in params.evaluate.benchmarks.items()
                if spec.task == "vqa" and spec.images.name == split)


GROUPS = ("eval", "shifted, seen pair", "shifted, held-out pair", "shifted, no object named")


def shift_by_cause(params, world: Path, count: int, prompt: str, stored: tuple, evaluation: tuple) -> list[list[str]]:
    """Section 4's rows; `stored` and `evaluation` are sections 1's and 2's inputs, not computed again."""
    vocabulary = json.loads((world / "world.json").read_text())["vocabulary"]
    held_out = {tuple(pair) for pair in vocabulary["held_out_pairs"]}
    teacher = load_teacher(*resolve_teacher(params.evaluate.teacher), device="cpu")
    probes = attribute_probes(*stored)
    rows: dict[str, Counter] = {group: Counter() for group in GROUPS}
    for split in ("eval", "shifted"):
        run = evaluation if split == "eval" else describe(params, world, count, prompt, split)
        (described, _), scenes, (questions, annotations) = run
        ranked, embedded = teacher_pairs(params, split, teacher, scenes, vocabulary)
        for image_id, scene in scenes.items():
            said = parse(described[image_id])
            if len(scene["objects"]) == 1:  # the probes were fitted on single-object images
                group = object_group(split, scene["objects"][0], held_out)
                rows[group]["single"] += 1
                for name, (layer, classes) in probes.items():
                    guess = classes[layer(10 * embedded[image_id][None]).argmax().item()]
                    rows[group][f"probe {name}"] += guess == scene["objects"][0][name]
            for obj in scene["objects"]:
                group = object_group(split, obj, held_out)
                rows[group]["objects"] += 1
                rows[group]["teacher"] += (obj["colour"], obj["shape"]) in ranked[image_id][:len(scene["objects"])]
                rows[group]["described"] += any(s[:2] == (obj["colour"], obj["shape"]) for s in said)
        answers = recorded_answers(params, vqa_benchmark(params, split))
        humans = {a["question_id"]: a["answers"] for a in annotations["annotations"]}
        for question in questions["questions"]:
            if question["image_id"] not in scenes:
                continue
            scene = scenes[question["image_id"]]
            obj = question_object(question["question"], scene)
            group = object_group(split, obj, held_out) if obj else "eval" if split == "eval" else GROUPS[3]
            read = answer(question["question"], parse(described[question["image_id"]]))
            rows[group]["questions"] += 1
            for column, given in [("reader", read), *((c, a[question["question_id"]]) for c, a in answers.items())]:
                rows[group][column] += question_accuracy(humans[question["question_id"]], given)
    columns = [f"VQA {mode}" for mode in params.evaluate.vqa_modes] + ["blank"]
    return [[group, str(row["objects"]) if row["objects"] else "–",
             *(f"{row[k] / row['single']:.2f} of {row['single']}" if row["single"] else "–"
               for k in ("probe colour", "probe shape")),
             *(f"{row[k] / row['objects']:.2f}" if row["objects"] else "–" for k in ("teacher", "described")),
             str(row["questions"]),
             *(f"{100 * row[k] / row['questions']:.1f}" if row["questions"] else "–" for k in ("reader", *columns))]
            for group, row in rows.items()]


def object_group(split: str, obj: dict, held_out: set) -> str:
    if split == "eval":
        return "eval"
    return "shifted, held-out pair" if (obj["colour"], obj["shape"]) in held_out else "shifted, seen pair"


def question_object(question: str, scene: dict) -> dict | None:
    """The object of the scene a world question asks about (None: a count, or a pair the image lacks)."""
    words = question.lower().rstrip("?").split()
    matches = {"What color is the": lambda o: o["shape"] == words[-1],
               "What shape is the": lambda o: o["colour"] == words[-2],
               "Where is the": lambda o: (o["colour"], o["shape"]) == (words[-2], words[-1]),
               "Is there": lambda o: (o["colour"], o["shape"]) == (words[-2], words[-1])}
    test = next((match for start, match in matches.items() if question.startswith(start)), None)
    return next((o for o in scene["objects"] if test(o)), None) if test else None


def attribute_probes(x: torch.Tensor, records: list[dict]) -> dict[str, tuple[torch.nn.Linear, list[str]]]:
    """Colour and shape probes fitted on every single-object training image's stored embedding."""
    single = [row for row, record in enumerate(records) if len(record["objects"]) == 1]
    probes = {}
    for name in ("colour", "shape"):
        labels = [records[row]["objects"][0][name] for row in single]
        classes = sorted(set(labels))
        probes[name] = (fit_probe(x[single], torch.tensor([classes.index(v) for v in labels]), len(classes)),
                        classes)
    return probes


def teacher_pairs(params, split: str, teacher, scenes: dict, vocabulary: dict):
    """Each image's colour-shape pairs, most similar first, by the teacher's cos(image, "a {colour} {shape}"),
    and its image embedding as the features stage computes it (what the probes were fitted on)."""
    spec = params.evaluate.benchmarks[vqa_benchmark(params, split)]
    embedded, _ = image_features(spec, list(scenes), teacher, params.evaluate.cache / f"grounding-{split}-pooled",
                                 False, "cpu")
    embedded = {image_id: embedding.float() for image_id, embedding in embedded.items()}
    pairs = [(c, s) for c in vocabulary["colours"] for s in vocabulary["shapes"]]
    with torch.no_grad():
        texts = teacher.model.encode_text(teacher.tokenizer([f"a {c} {s}" for c, s in pairs])).float()
    similarity = torch.stack([embedded[i] for i in scenes]) @ torch.nn.functional.normalize(texts, dim=1).T
    ranked = {i: [pairs[k] for k in row.argsort(descending=True).tolist()]
              for i, row in zip(scenes, similarity, strict=True)}
    return ranked, embedded


def recorded_answers(params, benchmark: str) -> dict[str, dict[int, str]]:
    """The recorded evaluation's answers with the image, per VQA mode, and describe's (or the headline's) blank."""
    modes = params.evaluate.vqa_modes
    where = {mode: mode_folder(params.evaluate.output / benchmark, mode, modes) for mode in modes}
    files = {f"VQA {mode}": where[mode] / "predictions.json" for mode in modes}
    files["blank"] = where["describe" if "describe" in modes else modes[0]] / "predictions_blank.json"
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise SystemExit(f"{missing[0]} does not exist: run the evaluation (dvc repro evaluate) with these params")
    return {column: {p["question_id"]: p["answer"] for p in json.loads(path.read_text())}
            for column, path in files.items()}


def parse(description: str) -> list[tuple[str, str, str | None]]:
    """(colour, shape, position or None) of every object the description names."""
    return [(m.group(2), m.group(3), POSITION_OF_PHRASE.get(m.group(4))) for m in OBJECT.finditer(description)]


DESCRIPTION_MEASURES = ("colour", "shape", "colour + shape", "colour + shape + position", "object count")


def description_scores(descriptions: dict[int, str], scenes: dict[int, dict]) -> list[float]:
    named = Counter()
    objects = 0
    for image_id, scene in scenes.items():
        said = parse(descriptions[image_id])
        named["object count"] += len(said) == len(scene["objects"])
        for obj in scene["objects"]:
            objects += 1
            same = [s for s in said if s[:2] == (obj["colour"], obj["shape"])]
            named["colour"] += any(s[0] == obj["colour"] for s in said)
            named["shape"] += any(s[1] == obj["shape"] for s in said)
            named["colour + shape"] += bool(same)
            named["colour + shape + position"] += any(s[2] == obj["position"] for s in same)
    return [named[m] / (len(scenes) if m == "object count" else objects) for m in DESCRIPTION_MEASURES]


def scene_text(scene: dict) -> str:
    return " and ".join(f"a {o['size']} {o['colour']} {o['shape']} {POSITION_PHRASES[o['position']]}"
                        for o in scene["objects"])


def answer(question: str, said: list[tuple[str, str, str | None]]) -> str:
    """The world's five question kinds answered from the named objects (a guess where they say nothing)."""
    words = question.lower().rstrip("?").split()
    if question.startswith("What color is the"):
        return next((c for c, s, _ in said if s == words[-1]), "")
    if question.startswith("What shape is the"):
        return next((s for c, s, _ in said if c == words[-2]), "")
    if question.startswith("Where is the"):
        return next((p for c, s, p in said if (c, s) == (words[-2], words[-1]) and p), "")
    if question.startswith("How many shapes"):
        return str(len(said))
    if question.startswith("How many"):
        return str(sum(c == words[2] or s + "s" == words[2] for c, s, _ in said))
    if question.startswith("Is there"):
        return "yes" if (words[-2], words[-1]) in {(c, s) for c, s, _ in said} else "no"
    return ""


def read_and_score(questions: tuple[dict, dict], descriptions: dict[int, str]) -> list[str]:
    questions_file, annotations_file = questions
    asked = [q for q in questions_file["questions"] if q["image_id"] in descriptions]
    ids = {q["question_id"] for q in asked}
    predictions = [{"question_id": q["question_id"],
                    "answer": answer(q["question"], parse(descriptions[q["image_id"]]))} for q in asked]
    result = score_vqa({**questions_file, "questions": asked},
                       {**annotations_file, "annotations": [a for a in annotations_file["annotations"]
                                                            if a["question_id"] in ids]},
                       predictions, "official", sources={"questions": "questions", "annotations": "annotations",
                                                          "predictions": "reader"})
    per_type = ", ".join(f"{kind} {value:.1f}" for kind, value in sorted(result["perQuestionType"].items()))
    return [f"{result['overall']:.2f}", per_type]


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
