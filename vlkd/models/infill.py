"""Prompts with one `<mask>` and the text a BART model generated in its place.

BART is a denoiser: given "Question: What color is the circle? Answer: <mask>" it does not write the
answer alone, it writes the whole input again with the mask filled in ("Question: What color is the
circle? Answer: red"). The answer is therefore what stands between the prompt's text before the mask
(the prefix) and its text after it (the suffix) in the generation. `extract_infill` finds it, by these
rules, in order:

1. Matching ignores case and whitespace ("answer:red" matches "Answer: red"): the model may drop or add
   spaces around the filled span, and a small model may change case.
2. The prefix is looked for from the start of the generation; the infill starts right after its first
   occurrence. An empty prefix matches at the start.
3. If the prefix is not reproduced (the model paraphrased it), the infill starts after the LAST
   occurrence of the prefix's final words (its last 3 words, else 2, else 1) if these are at least
   `MIN_TAIL_CHARS` characters long without spaces; if none of them occurs, the whole generation is the
   infill. (A short final word is no evidence of the prompt: "A picture of <mask>" answered "two
   shapes, a star to the left of a circle" would otherwise give "a circle", the description's "of"
   taken for the prompt's. "Answer:" is long enough.)
4. The infill ends where the suffix starts: at the end of the generation if the generation ends with the
   suffix, else at the suffix's first occurrence after the infill's start; a suffix that is not
   reproduced (or an empty one) leaves the infill running to the end.
5. The result is stripped of surrounding whitespace; nothing else is changed (answer normalisation is
   the evaluator's job).

Pass the generation decoded with `skip_special_tokens=True`: `<s>`, `</s>` and `<pad>` are not text.
"""

from __future__ import annotations

import string

import torch

from vlkd.errors import VlkdError

MASK = "<mask>"
TAIL_WORDS = (3, 2, 1)  # rule 3: how many of the prefix's final words to look for, longest first
MIN_TAIL_CHARS = 4  # rule 3: shorter final words ("of", "is", "a") are not looked for


def fill_prompt(template: str, **fields: str) -> str:
    """`template` with its `{name}` fields filled (whitespace inside a value collapsed to single spaces).
    The result must hold exactly one `<mask>`: the one place the model is asked to fill."""
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    missing = sorted(names - fields.keys())
    if missing:
        raise VlkdError(f"prompt template {template!r} names field(s) {missing} but only {sorted(fields)} are "
                        "given; use only these names in the template")
    prompt = template.format(**{name: " ".join(str(value).split()) for name, value in fields.items()})
    if prompt.count(MASK) != 1:
        raise VlkdError(f"prompt template {template!r} gives {prompt.count(MASK)} {MASK} tokens, not exactly one; "
                        f"put one {MASK} where the model should write")
    return prompt


def extract_infill(prompt: str, generated: str) -> str:
    """The text `generated` put in place of the single `<mask>` of `prompt` (rules in the module doc)."""
    if prompt.count(MASK) != 1:
        raise ValueError(f"prompt {prompt!r} must hold exactly one {MASK}")
    prefix, suffix = prompt.split(MASK)
    text, positions = _squeeze(generated)
    start = _infill_start(prefix, text)
    end = _infill_end(_squeeze(suffix)[0], text, start)
    begin = positions[start] if start < len(text) else len(generated)
    finish = positions[end - 1] + 1 if end > start else begin
    return generated[begin:finish].strip()


def rewrites_prompt(prompt: str, generated: str) -> bool:
    """Whether `generated` starts by writing `prompt`'s text before its `<mask>` again (case and whitespace
    aside): BART's faithful rewrite of its input, which a student that writes a caption first does not do."""
    return _squeeze(generated)[0].startswith(_squeeze(prompt.split(MASK)[0])[0])


def _squeeze(text: str) -> tuple[str, list[int]]:
    """`text` lower-cased without whitespace, and for each kept character its index in `text`."""
    kept = [(index, char) for index, char in enumerate(text.lower()) if not char.isspace()]
    return "".join(char for _, char in kept), [index for index, _ in kept]


def _infill_start(prefix: str, text: str) -> int:
    """Index in the squeezed generation `text` where the infill begins (rules 2 and 3)."""
    squeezed = _squeeze(prefix)[0]
    found = text.find(squeezed)
    if found >= 0:
        return found + len(squeezed)
    words = prefix.lower().split()
    for count in TAIL_WORDS:
        tail = "".join(words[-count:])
        if len(words) >= count and len(tail) >= MIN_TAIL_CHARS:
            found = text.rfind(tail)
            if found >= 0:
                return found + len(tail)
    return 0


def _infill_end(suffix: str, text: str, start: int) -> int:
    """Index in the squeezed generation where the infill ends (rule 4)."""
    if not suffix:
        return len(text)
    if text.endswith(suffix) and len(text) - len(suffix) >= start:
        return len(text) - len(suffix)
    found = text.find(suffix, start)
    return found if found >= 0 else len(text)


@torch.no_grad()
def generate_texts(bart, tokenizer, encoder_inputs: dict, num_beams: int, max_new_tokens: int,
                   forced: list[str] | None = None) -> list[str]:
    """Beam search of a BART from `encoder_inputs` (input_ids or inputs_embeds, and attention_mask), decoded
    without special tokens; at most `max_new_tokens` tokens (capped at the model's positions).

    `forced`, one text per input: the decoder is made to start with that text (as BART's decoder starts a
    rewrite: `</s> <s>` and its tokens) and beam search writes only what follows, `max_new_tokens` at most.
    Inputs are generated in groups of equal forced length: BART's decoder has absolute positions, so a
    padded start would shift them."""
    beams = {"num_beams": num_beams, "early_stopping": True} if num_beams > 1 else {"num_beams": 1}
    if forced is None:
        limit = min(max_new_tokens, bart.config.max_position_embeddings)
        output = bart.generate(**encoder_inputs, **beams, max_new_tokens=limit)
        return tokenizer.batch_decode(output, skip_special_tokens=True)
    starts = [[bart.config.decoder_start_token_id] + tokenizer(text).input_ids[:-1] for text in forced]
    groups: dict[int, list[int]] = {}
    for row, start in enumerate(starts):
        groups.setdefault(len(start), []).append(row)
    texts: list[str] = [""] * len(starts)
    for length, rows in sorted(groups.items()):
        index = torch.tensor(rows, device=bart.device)
        inputs = {name: tensor[index] for name, tensor in encoder_inputs.items()}
        output = bart.generate(**inputs, decoder_input_ids=torch.tensor([starts[r] for r in rows], device=bart.device),
                               **beams, max_new_tokens=max(1, min(max_new_tokens,
                                                                  bart.config.max_position_embeddings - length)))
        for row, text in zip(rows, tokenizer.batch_decode(output, skip_special_tokens=True), strict=True):
            texts[row] = text
    return texts


def generate_infills(bart, tokenizer, encoder_inputs: dict, prompts: list[str], num_beams: int, max_new_tokens: int,
                     forced: bool) -> list[str]:
    """`generate_texts` for prompts with a `<mask>` (encoded in `encoder_inputs`), with the budget each way of
    decoding needs for `max_new_tokens` of infill: free, the whole prompt rewritten; forced, the prompt up to
    its mask given to the decoder, then the infill and the prompt's text after the mask."""
    if not forced:
        prompt_tokens = max(len(ids) for ids in tokenizer(prompts).input_ids)  # the padded prompts' length
        return generate_texts(bart, tokenizer, encoder_inputs, num_beams, prompt_tokens + max_new_tokens)
    return generate_texts(bart, tokenizer, encoder_inputs, num_beams,
                          max_new_tokens + max(suffix_tokens(tokenizer, p) for p in prompts) + 1,
                          forced=[forced_start(p) for p in prompts])


def forced_start(prompt: str) -> str:
    """What the decoder is made to write first under forced decoding: the prompt's text before its `<mask>`,
    without the space before it (a byte-level BPE writes that space as part of the next word's token)."""
    return prompt.split(MASK)[0].rstrip()


def suffix_tokens(tokenizer, prompt: str) -> int:
    """Tokens of the prompt's text after its `<mask>`, which a forced rewrite must still be able to write."""
    return len(tokenizer(prompt.split(MASK)[1], add_special_tokens=False).input_ids)
