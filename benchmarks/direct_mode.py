"""Why direct-mode VQA (the paper's inference) fails or works: the answer each model would give, teacher-forced.

    python benchmarks/direct_mode.py [--params params.yaml] [--split eval|shifted] [--student DIR ...]

Needs a finished pipeline on the embedded world (`make demo` or `dvc repro`). For every VQA question of the
split, each model reads `evaluate.vqa_prompt` and its decoder is teacher-forced on the prompt it rewrites
("Question: q Answer:"), as generation does; the distribution of the next token is the answer's first token.
Against the same questions in the same run:

  plm, true scene   the language model distillation started from, with the scene's true description in front
                    (what the image prefix stands for; its ceiling in this world)
  plm, no text      the language model with the prompt alone (the question-type prior it has learnt)
  student, image    `[image prefix ; prompt]`, the paper's inference
  student, blank    the blank image's prefix (the evaluation's blank control)
  student, true scene as text   the student's language model reading the scene's true description, no
                    image: what distillation left of the reading it started from

and for each, per question type: `gold` the mean probability of the gold answer's first token; `kind` the
probability mass on first tokens of answers of the question's kind (every gold answer of that type in
the split: does the model follow the question?); `pick` how often the gold answer is the likeliest of
its kind (a model that follows the question and reads the image); `top` how often the likeliest token
of the whole vocabulary is of the question's kind.

Then what the students write when nothing is forced (beam search, as the evaluation decodes): how often
the generation rewrites the prompt's text before the mask as it was given (`prompt kept`), and how often
it ends right after a one-word answer (`stops`). A student that reads the answer right teacher-forced but
rewrites another question, or goes on writing after its answer, fails here and not in reading.

This is a diagnostic of the embedded world (its scene records), not of any model.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from grounding import print_table, scene_text, vqa_benchmark

from vlkd.config import load_params
from vlkd.data.vqa_metric import read_json
from vlkd.distill.reading import answer_slot_inputs
from vlkd.evaluate.images import image_features
from vlkd.models.infill import MASK, extract_infill, fill_prompt
from vlkd.models.student import Student, load_language_model
from vlkd.models.teacher import load_teacher, resolve_teacher

BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the project's)")
    parser.add_argument("--split", default="eval", choices=("eval", "shifted"))
    parser.add_argument("--student", type=Path, action="append", help="student folder(s) (default: evaluate.student)")
    args = parser.parse_args()
    params = load_params(args.params)
    spec = params.evaluate.benchmarks[vqa_benchmark(params, args.split)]
    questions = read_json(spec.questions)["questions"]
    gold = {a["question_id"]: a for a in read_json(spec.annotations)["annotations"]}
    scene_file = params.synth.output / "scenes" / f"{args.split}.jsonl"
    scenes = {s["image_id"]: s for s in map(json.loads, scene_file.open())}
    prompts = [fill_prompt(params.evaluate.vqa_prompt, question=q["question"]) for q in questions]
    heads = [prompt.split(MASK)[0].rstrip() for prompt in prompts]

    bart, tokenizer = load_language_model(params.evaluate.plm, "evaluate.plm")
    bart.eval()
    kinds = answer_kinds(tokenizer, gold.values())
    described = [f"{scene_text(scenes[q['image_id']])}. " for q in questions]
    readings = {"plm, true scene": read(bart, tokenizer, [d + p for d, p in zip(described, prompts, strict=True)],
                                        [d + h for d, h in zip(described, heads, strict=True)]),
                "plm, no text": read(bart, tokenizer, prompts, heads)}
    written, embedded = [], {}
    for folder in args.student or [params.evaluate.student]:
        student = Student.from_pretrained(folder, "cpu")
        patch = student.config.prefix == "patch"
        if patch not in embedded:  # the evaluation images, embedded once for every student of that prefix
            teacher = load_teacher(*resolve_teacher(params.evaluate.teacher), device="cpu", image_tokens=patch)
            embedded[patch] = image_features(spec, sorted({q["image_id"] for q in questions}), teacher,
                                             params.evaluate.cache / f"direct-{args.split}", patch, "cpu")
        features, blank = embedded[patch]
        name = "student" if not args.student or len(args.student) == 1 else f"student {folder}"
        # the student's own language model reading the true scene as text, no image: what distillation left of
        # the reading its language model had ("plm, true scene"), whatever the prefix does
        readings[f"{name}, true scene as text"] = read(student, tokenizer, [d + p for d, p in zip(
            described, prompts, strict=True)], [d + h for d, h in zip(described, heads, strict=True)])
        for condition, prefix in (("image", torch.stack([features[q["image_id"]] for q in questions])),
                                  ("blank", blank.expand(len(questions), *blank.shape))):
            readings[f"{name}, {condition}"] = read(student, tokenizer, prompts, heads, prefix)
            written.append([f"{name}, {condition}", *free_generation(student, params.evaluate, prompts, heads, prefix)])
    rows = []
    for name, logprobs in readings.items():
        for kind, value in measures(logprobs, questions, gold, kinds, tokenizer).items():
            rows.append([name, kind, *value])
    print_table(f"answers teacher-forced after the prompt ({args.split} split, {len(questions)} questions)",
                ["model", "question type", "count", "gold", "kind", "pick", "top"], rows)
    print_table("what the students write (beam search, as evaluated)", ["model", "prompt kept", "stops"], written)


def free_generation(student: Student, evaluate, prompts: list[str], heads: list[str],
                    prefix: torch.Tensor) -> list[str]:
    """The shares of generations that rewrite the prompt's head unchanged, and that stop after one word."""
    kept = stops = 0
    for begin in range(0, len(prompts), BATCH):
        texts = student.generate(prefix[begin:begin + BATCH], prompts[begin:begin + BATCH], evaluate.num_beams,
                                 evaluate.vqa_max_new_tokens)
        for prompt, head, text in zip(prompts[begin:begin + BATCH], heads[begin:begin + BATCH], texts, strict=True):
            kept += " ".join(text.split()).startswith(" ".join(head.split()))
            answer = extract_infill(prompt, text)
            stops += len(answer.split()) == 1 and " ".join(text.split()).endswith(answer)
    return [f"{kept / len(prompts):.2f}", f"{stops / len(prompts):.2f}"]


def answer_kinds(tokenizer, annotations) -> dict[str, set[int]]:
    """Question type -> the first tokens of every gold answer of that type."""
    kinds = defaultdict(set)
    for annotation in annotations:
        kinds[annotation["question_type"]].add(first_token(tokenizer, annotation["multiple_choice_answer"]))
    return kinds


def first_token(tokenizer, answer: str) -> int:
    """The answer's first token as the decoder writes it after "Answer:" (with its leading space)."""
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0]


@torch.no_grad()
def read(model, tokenizer, encoder_texts: list[str], heads: list[str], prefix: torch.Tensor | None = None):
    """[questions, vocabulary] log-probabilities of the token after each head, teacher-forced."""
    out = []
    bart = model.bart if isinstance(model, Student) else model
    for begin in range(0, len(encoder_texts), BATCH):
        inputs = answer_slot_inputs(tokenizer, encoder_texts[begin:begin + BATCH], heads[begin:begin + BATCH],
                                    bart.config.decoder_start_token_id, 256)
        if prefix is None:
            logits = bart(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                          decoder_input_ids=inputs["decoder_input_ids"]).logits
        else:
            logits = model.decoder_logits(inputs["input_ids"], inputs["attention_mask"], inputs["decoder_input_ids"],
                                          prefix[begin:begin + BATCH])
        out.append(logits[torch.arange(len(logits)), inputs["answer_position"][:, 0]].log_softmax(-1))
    return torch.cat(out)


def measures(logprobs: torch.Tensor, questions: list[dict], gold: dict, kinds: dict, tokenizer) -> dict[str, list]:
    by_type = defaultdict(list)
    for row, question in enumerate(questions):
        annotation = gold[question["question_id"]]
        kind = sorted(kinds[annotation["question_type"]])
        right = first_token(tokenizer, annotation["multiple_choice_answer"])
        probs = logprobs[row].exp()
        values = (probs[right].item(), probs[kind].sum().item(),
                  float(kind[int(probs[kind].argmax())] == right), float(int(probs.argmax()) in kind))
        by_type[annotation["question_type"]].append(values)
        by_type["all"].append(values)
    return {kind: [len(values), *(f"{sum(v[i] for v in values) / len(values):.2f}" for i in range(4))]
            for kind, values in sorted(by_type.items(), key=lambda item: item[0] != "all")}


if __name__ == "__main__":
    main()
