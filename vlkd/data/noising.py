"""BART's text infilling: spans of Poisson(lambda) length cover about `ratio` of the tokens, and each
span becomes one mask token; a span of length 0 inserts a mask (the model must learn that nothing is
missing there). The same noise pretrains the embedded language model and drives ICTI.

Written here because `transformers` has no BART denoising collator (its `DataCollatorForLanguageModeling`
masks single tokens in place, the BERT way); this follows fairseq's `DenoisingDataset` with
`replace_length=1` on subword tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def infill_spans(tokens: Sequence[int], mask_id: int, ratio: float, poisson_lambda: float,
                 rng: np.random.Generator) -> list[int]:
    """`tokens` (without BOS/EOS) with spans replaced by `mask_id`. At least one token is masked when
    `ratio` > 0 and there are tokens; `ratio` 1 masks everything into a single mask."""
    count = len(tokens)
    budget = int(round(count * ratio))
    if count == 0 or ratio <= 0:
        return list(tokens)
    budget = max(budget, 1)
    masked = np.zeros(count, dtype=bool)
    inserts: set[int] = set()
    while masked.sum() < budget:
        length = int(rng.poisson(poisson_lambda))
        start = int(rng.integers(0, count))
        if length == 0:
            inserts.add(start)
            continue
        masked[start:start + min(length, budget - int(masked.sum()))] = True
    return _collapse(tokens, masked, inserts, mask_id)


def _collapse(tokens: Sequence[int], masked: np.ndarray, inserts: set[int], mask_id: int) -> list[int]:
    noisy: list[int] = []
    for position, token in enumerate(tokens):
        if position in inserts and not masked[position] and (not noisy or noisy[-1] != mask_id):
            noisy.append(mask_id)
        if masked[position]:
            if not noisy or noisy[-1] != mask_id:
                noisy.append(mask_id)
        else:
            noisy.append(token)
    return noisy
