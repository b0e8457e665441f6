"""Answering and captioning with a student: prompts in, generated answers out, batched and cut out of BART's
rewritten prompts. One code path for `vlkd evaluate` (every benchmark under every control) and for
`vlkd predict` / `load_model` (the user's own images), so that the same image and question get the same
answer in both.

How a model is asked (prompts, beams, token budgets, batch size) is `vlkd.inference.asking.Asking`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from vlkd.inference.asking import Asking
from vlkd.models.infill import extract_infill, fill_prompt, generate_infills, rewrites_prompt
from vlkd.models.student import Student


@dataclass(frozen=True)
class FeatureRows:
    """One condition's image features for a list of prompts, without a copy per prompt: `table` holds each
    image's features once ([images + 1, ...], the blank image last) and prompt i uses row `rows[i]` of it.
    VQAv2 has ~5 questions per image, so a tensor per question would be ~5x the images' features for each
    condition (hundreds of GB with patch tokens); `Generator` gathers each batch from the table."""

    table: torch.Tensor
    rows: torch.Tensor  # LongTensor [prompts]


class Generator:
    """Batched beam search over prompts for one model and one benchmark's feature table, answers cut out of
    the outputs. Each distinct input (table row and prompt, or the prompt alone without an image) is
    generated once per generator and a repeat gets its answer: under the blank control every question has
    the same image and under text only none, and question templates repeat (the embedded world's 991
    questions are 103 distinct ones; VQAv2's "What color is the ...?" likewise), so a control costs its
    distinct questions, and the shuffled control reuses what the image condition generated."""

    def __init__(self, student: Student, plm: tuple, asking: Asking, max_new_tokens: int):
        self.student, self.plm, self.asking, self.max_new_tokens = student, plm, asking, max_new_tokens
        self.forced = asking.decoding == "forced"
        self._answers: dict[tuple[int | None, str], str] = {}
        self._kept: dict[tuple[int | None, str], bool] = {}  # whether the generation rewrote the prompt first
        self._table: torch.Tensor | None = None

    def answers(self, prompts: list[str], features: FeatureRows | None, what: str) -> list[str]:
        """`features` None: the language model alone, no image."""
        rows: list[int | None] = [None] * len(prompts) if features is None else features.rows.tolist()
        if features is not None:
            if self._table is not None and features.table is not self._table:
                raise ValueError("a Generator answers from one feature table; make another for another table")
            self._table = features.table
        inputs = list(zip(rows, prompts, strict=True))
        todo = list(dict.fromkeys(key for key in inputs if key not in self._answers))
        size = self.asking.batch_size
        for begin in tqdm(range(0, len(todo), size), desc=what, unit="batch", disable=None, leave=False):
            batch = todo[begin:begin + size]
            texts_in = [prompt for _, prompt in batch]
            if features is None:
                texts = self._text_only(texts_in)
            else:
                texts = self.student.generate(features.table[long_tensor([row for row, _ in batch])], texts_in,
                                              self.asking.num_beams, self.max_new_tokens, self.forced)
            for key, text in zip(batch, texts, strict=True):
                self._answers[key] = extract_infill(key[1], text)
                self._kept[key] = rewrites_prompt(key[1], text)
        return [self._answers[key] for key in inputs]

    def prompt_kept(self, prompts: list[str], features: FeatureRows | None) -> float:
        """The share of these (already answered) inputs whose generation rewrote the prompt as given before
        its answer: the rewrite fidelity the paper's inference relies on (1.0 under forced decoding).
        `features` None: the language model's own, without an image."""
        rows: list[int | None] = [None] * len(prompts) if features is None else features.rows.tolist()
        keys = list(zip(rows, prompts, strict=True))
        return round(sum(self._kept[key] for key in keys) / max(1, len(keys)), 4)

    def _text_only(self, prompts: list[str]) -> list[str]:
        bart, tokenizer = self.plm
        encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(bart.device)
        return generate_infills(bart, tokenizer, dict(encoded), prompts, self.asking.num_beams, self.max_new_tokens,
                                self.forced)


def described_answers(records: list[dict], prompts: list[str], features: FeatureRows | None, describer: Generator,
                       answerer: Generator, asking: Asking, what: str) -> tuple[list[str], dict[int, str]]:
    """VQA mode `describe`: the model under test describes each image (the caption prompt, with that
    condition's features, or the language model alone for text_only), and the language model before
    distillation answers "<description>. <vqa prompt>" from text, as it was pretrained to."""
    first_row: dict[int, int] = {}
    for row, record in enumerate(records):
        first_row.setdefault(record["image_id"], row)
    image_ids = list(first_row)
    prompt = fill_prompt(asking.describe_prompt)
    if features is None:  # text_only: one prompt, no image, so one description for every image
        descriptions = describer.answers([prompt], None, f"{what} describe") * len(image_ids)
    else:  # identical features (the blank control, the same row for every image) are described once
        table_rows = features.rows[[first_row[i] for i in image_ids]].tolist()
        groups = rows_by_value(features.table, sorted(set(table_rows)))
        described = describer.answers([prompt] * len(groups), FeatureRows(features.table, long_tensor(
            [group[0] for group in groups])), f"{what} describe")
        description_of_row = {row: text for group, text in zip(groups, described, strict=True) for row in group}
        descriptions = [description_of_row[row] for row in table_rows]
    by_image = dict(zip(image_ids, descriptions, strict=True))
    contexts = [f"{by_image[record['image_id']].rstrip('. ')}. {prompt}" for record, prompt in
                zip(records, prompts, strict=True)]
    return answerer.answers(contexts, None, f"{what} answer"), by_image



def long_tensor(rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def rows_by_value(table: torch.Tensor, rows: list[int]) -> list[list[int]]:
    """`rows` of `table` grouped by equal features, the groups in ascending lexicographic order of their
    flattened features: the grouping and order `torch.unique(dim=0)` gives, which describe mode's batches
    always had (a batch's composition can change a model's floating-point results). Computed on row
    numbers, one feature column at a time, so no features are copied."""
    flat = table.reshape(len(table), -1)
    groups: list[list[int]] = []
    pending = [(long_tensor(rows), 0)]  # a stack whose top holds the smallest features not yet grouped
    while pending:
        members, column = pending.pop()
        if len(members) <= 1 or column == flat.shape[1]:
            groups += [members.tolist()] if len(members) else []
            continue
        values, order = flat[members, column].sort(stable=True)
        members = members[order]
        counts = torch.unique_consecutive(values, return_counts=True)[1].tolist()
        if len(counts) == 1 and all(torch.equal(flat[members[0]], flat[row]) for row in members[1:]):
            groups.append(members.tolist())  # identical features: one group, without walking every column
            continue
        pending += [(part, column + 1) for part in reversed(torch.split(members, counts))]
    return groups
