"""Caption reading (not in the paper): the student reads an image as its language model reads the image's caption.

The paper's zero-shot VQA puts the image prefix where a text language model would have a description:
`[image prefix ; "Question: q Answer: <mask>"]`. Nothing in TTDM, ITCL or ICTI ever shows the encoder a
prefix followed by a question, so the prefix is trained to fill in captions, not to be read as one; on the
embedded world the student then answers below the question-type prior (docs/experiments.md, "Direct mode").
This term aligns the prefix with the text it stands for, at the place the inference uses it:

  teacher  the frozen language model (the one distillation started from) reading
           `"<caption>. Question: q Answer: <mask>"` for each of the image's captions: its greedy answer
           up to its end of text, and its distribution at each of those tokens, the captions' readings
           combined as a product;
  student  `[image prefix ; "Question: q Answer: <mask>"]`, teacher-forced on the prompt it rewrites and
           on that answer: KL(teacher || student) at each of the answer's tokens and at its end, plus the
           cross-entropy of rewriting the prompt itself (the language model's own habit, which the prefix
           must not displace).

The questions are the ones in the language model's own text corpus (`plm.corpus`), paired with training
images at random, and the answers are the language model's own reading of the caption: no question-answer
pair about a training image is ever given, the zero-shot rule of VQA evaluation. The term needs a corpus
with questions in the prompt's form; a corpus without any is one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import BartForConditionalGeneration

from vlkd.data.text import qa_pairs, read_documents
from vlkd.errors import VlkdError
from vlkd.models.infill import MASK, fill_prompt

ANSWER_TOKENS = 4  # the language model's answer is followed this far (VQA answers are a word or a few)


class CaptionReading:
    """Questions of the language model's corpus, and per batch of captions the two sides of the term."""

    def __init__(self, corpus: Path, tokenizer, language_model: BartForConditionalGeneration, prompt: str,
                 max_length: int, device: torch.device):
        questions = sorted({question for document in read_documents(corpus, "plm.corpus")
                            for question, *_ in qa_pairs(document)[1]})
        if not questions:
            raise VlkdError(f"distill.reading_weight needs questions in the language model's corpus {corpus} "
                            "(\"... Question: q Answer: a\"), and it has none; set distill.reading_weight: 0")
        fill_prompt(prompt, question=questions[0])  # a bad template is one line before training starts
        if not prompt.rstrip().endswith(MASK):
            raise VlkdError(f"distill.reading_prompt {prompt!r} must end with {MASK}: the answer is read at the "
                            "token after the prompt's text")
        self.questions, self.prompt, self.tokenizer, self.max_length = questions, prompt, tokenizer, max_length
        self.reader = language_model.to(device).eval().requires_grad_(False)
        self.device = device

    def batch(self, captions: list[list[str]], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The student's encoder text, decoder inputs, copy labels and answer slots, and the teacher's
        log-probabilities at each slot, for one question drawn per image; `captions` holds each image's
        captions (one or several)."""
        drawn = rng.integers(len(self.questions), size=len(captions))
        prompts = [fill_prompt(self.prompt, question=self.questions[i]) for i in drawn]
        heads = [prompt.split(MASK)[0].rstrip() for prompt in prompts]  # what the decoder writes before the answer
        answer, targets = self._reading(captions, prompts, heads)
        student = answer_slot_inputs(self.tokenizer, prompts, heads, self.reader.config.decoder_start_token_id,
                                     self.max_length, [tokens[:-1] for tokens in answer])
        student["target"] = targets
        return {name: tensor.to(self.device, non_blocking=True) for name, tensor in student.items()}

    @torch.no_grad()
    def _reading(self, captions: list[list[str]], prompts: list[str],
                 heads: list[str]) -> tuple[list[list[int]], torch.Tensor]:
        """The language model's greedy answer after each image's captions, up to its end-of-text (at most
        ANSWER_TOKENS tokens), and its log-probabilities at each of those slots [images, slots, vocabulary].
        An image's captions are combined as a product of experts (the mean log-probability, renormalised):
        where one caption states what is asked ("... at the top") and another does not ("two shapes: ..."),
        the answer is the one they agree on, led by the caption that knows, not an average that the
        uninformed captions flatten."""
        image = [row for row, listed in enumerate(captions) for _ in listed]
        described = [caption.strip().rstrip(".") + ". " for listed in captions for caption in listed]
        index = torch.tensor(image, device=self.device)
        eos = self.tokenizer.eos_token_id
        # The teacher's text is a caption (at most max_length tokens, as ICTI reads it) and the prompt, within
        # the positions the language model has, the answer's included.
        limit = min(2 * self.max_length, self.reader.config.max_position_embeddings - ANSWER_TOKENS - 1)
        inputs = answer_slot_inputs(
            self.tokenizer, [d + prompts[i] for d, i in zip(described, image, strict=True)],
            [d + heads[i] for d, i in zip(described, image, strict=True)],
            self.reader.config.decoder_start_token_id, limit)
        decoder = _CachedDecoder(self.reader, inputs, self.device)
        answers: list[list[int]] = [[] for _ in captions]
        slots = []
        for _ in range(ANSWER_TOKENS):
            # Only the captions of images whose answer has not ended are read again; the slots of an ended
            # answer are never used (the student's answer mask stops at its end-of-text).
            open_answers = [i for i, answer in enumerate(answers) if not answer or answer[-1] != eos]
            still_open = set(open_answers)
            active = [row for row, i in enumerate(image) if i in still_open]
            each = decoder.next_token([answers[image[row]] for row in active], active).float().log_softmax(-1)
            rows = index[active]
            summed = torch.zeros(len(captions), each.shape[1], device=self.device).index_add_(0, rows, each)
            counts = torch.bincount(rows, minlength=len(captions)).unsqueeze(1)
            slot = (summed / counts.clamp(min=1)).log_softmax(-1)  # an ended answer's row: uniform, unused
            slots.append(slot)
            chosen = slot.argmax(-1).tolist()  # one copy to the host per answer token
            for i in open_answers:
                answers[i].append(chosen[i])
            if all(answer[-1] == eos for answer in answers):
                break
        return answers, torch.stack(slots, 1)


class _CachedDecoder:
    """The frozen language model's decoder teacher-forced on each row's `[start, head..., answer so far]`,
    read at the row's newest token. Transformers' `generate` cannot do this: the rows' heads end at
    different columns, so their answers do too, and BART's positions are columns (no per-row position ids).
    What every row shares is the columns before its shortest head ends: the decoder runs on those once and
    keeps them as a key-value cache; each answer token then runs it only on the columns after them. Causal
    attention makes this the same computation as running the whole decoder again: a column never sees a
    later one, so the padding after a short row's tokens changes nothing in them."""

    def __init__(self, reader: BartForConditionalGeneration, inputs: dict[str, torch.Tensor], device: torch.device):
        self.reader, self.device = reader, device
        self.tokens = inputs["decoder_input_ids"]
        self.ends = inputs["answer_position"][:, 0] + 1  # each row's [start, head...] length
        self.shared = int(self.ends.min()) - 1  # cached columns: every row has one token after them
        self.rows = list(range(len(self.tokens)))  # the rows the cache and the encoder's states still hold
        self.attention = inputs["attention_mask"].to(device)
        self.encoded = reader.get_encoder()(input_ids=inputs["input_ids"].to(device),
                                            attention_mask=self.attention).last_hidden_state
        self.cache = None
        if self.shared:  # the base model: the cache without the vocabulary's logits at every column
            self.cache = reader.model(encoder_outputs=(self.encoded,), attention_mask=self.attention,
                                      decoder_input_ids=self.tokens[:, :self.shared].to(device),
                                      use_cache=True).past_key_values

    def next_token(self, answers: list[list[int]], rows: list[int]) -> torch.Tensor:
        """[len(rows), vocabulary] logits of the token after each row's head and answer so far. `rows` are
        the rows of the last call or fewer, in the same order (answers end, they never reopen): the cache
        drops the others once instead of being copied for every call."""
        self._keep(rows)
        pad = self.reader.config.pad_token_id
        tails = [self.tokens[row, self.shared:int(self.ends[row])].tolist() + answer
                 for row, answer in zip(rows, answers, strict=True)]
        decoder = torch.full((len(rows), max(map(len, tails))), pad, dtype=torch.long)
        for i, tail in enumerate(tails):
            decoder[i, :len(tail)] = torch.tensor(tail)
        hidden = self.reader.model(encoder_outputs=(self.encoded,), attention_mask=self.attention,
                                   decoder_input_ids=decoder.to(self.device), past_key_values=self.cache,
                                   use_cache=self.cache is not None).last_hidden_state
        if self.cache is not None:  # the decoder appended this call's columns: back to the shared ones
            self.cache.crop(self.shared - self.cache.get_seq_length())  # a negative count: tokens to remove
        last = torch.tensor([len(tail) - 1 for tail in tails], device=self.device)
        newest = hidden[torch.arange(len(rows), device=self.device), last]
        # As BartForConditionalGeneration computes its logits, at the one column that is read.
        return self.reader.lm_head(newest) + self.reader.final_logits_bias

    def _keep(self, rows: list[int]) -> None:
        if rows == self.rows:
            return
        position = {row: i for i, row in enumerate(self.rows)}
        kept = [position[row] for row in rows if row in position]
        if len(kept) != len(rows) or kept != sorted(kept):
            raise ValueError(f"rows {rows} are not the rows {self.rows} or fewer, in their order")
        selected = torch.tensor(kept, device=self.device)
        self.encoded, self.attention, self.rows = self.encoded[selected], self.attention[selected], rows
        if self.cache is not None:
            self.cache.batch_select_indices(selected)


def answer_slot_inputs(tokenizer, encoder_texts: list[str], decoder_texts: list[str], decoder_start: int,
                       max_length: int, answers: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Encoder ids of the texts; decoder inputs `[start, <s>, head..., answer...]` with the head as copy
    labels (-100 elsewhere); `answer_position` [rows, slots]: where the decoder predicts each answer token
    and the token after the given ones (the last slot), `answer_mask` which slots a row has."""
    answers = answers or [[] for _ in encoder_texts]
    encoder = tokenizer(encoder_texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    heads = [ids[:-1] for ids in tokenizer(decoder_texts, truncation=True, max_length=max_length)["input_ids"]]
    width = max(len(ids) + len(answer) for ids, answer in zip(heads, answers, strict=True)) + 1
    slots = max(len(answer) for answer in answers) + 1
    decoder = torch.full((len(heads), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(heads), width), -100, dtype=torch.long)
    position = torch.zeros((len(heads), slots), dtype=torch.long)
    mask = torch.zeros((len(heads), slots), dtype=torch.bool)
    for row, (ids, answer) in enumerate(zip(heads, answers, strict=True)):
        decoder[row, :len(ids) + len(answer) + 1] = torch.tensor([decoder_start, *ids, *answer])
        labels[row, :len(ids)] = torch.tensor(ids)
        position[row, :len(answer) + 1] = torch.arange(len(ids), len(ids) + len(answer) + 1)
        mask[row, :len(answer) + 1] = True
    return {"input_ids": encoder.input_ids, "attention_mask": encoder.attention_mask, "decoder_input_ids": decoder,
            "copy_labels": labels, "answer_position": position, "answer_mask": mask}
