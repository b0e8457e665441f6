"""Text retention during distillation: the language model's own infilling objective on its own corpus,
with no image, added to the VLKD losses with weight `distill.retention_weight` (0: the paper's three losses).

Why: ICTI on captions alone pulls the language model towards writing captions. In the embedded demo the
distilled student stopped following "Question: ... Answer: <mask>" (direct VQA 4.7%) and its held-out
infilling loss rose from 0.36 to 0.52 (1.25 after 4x longer distillation). The examples are made exactly as
`vlkd plm` made them (plm.make_example), with the answer masking the language model was pretrained with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlkd.data.text import Noise, collate, encode_documents, make_example, read_documents
from vlkd.models.language_model import MANIFEST, read_manifest

# A batch is drawn from a band of this many batches' worth of documents of neighbouring length: a batch
# of documents drawn from the whole corpus is padded to its longest (on the world's text 2.4x the mean
# length), and this pass is most of a distillation step's tokens.
BAND_BATCHES = 8


class RetentionBatches:
    """Random batches of noised documents of the corpus, of similar length: BART encoder inputs and labels."""

    def __init__(self, corpus: Path, tokenizer, plm_folder: Path, mask_ratio: float, poisson_lambda: float,
                 max_length: int):
        self.tokenizer = tokenizer
        self.documents = encode_documents(tokenizer, read_documents(corpus, "plm.corpus"), max_length)
        self.by_length = np.argsort([len(document.tokens) for document in self.documents], kind="stable")
        self.noise = Noise(mask_ratio, poisson_lambda, pretrained_answer_mask_share(plm_folder))

    def batch(self, size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """`size` documents from a band of neighbouring lengths that starts anywhere in the length order and
        wraps around its end, so that every document is equally likely to be drawn."""
        count = len(self.documents)
        band = min(count, size * BAND_BATCHES)
        offsets = rng.choice(band, size=size, replace=size > band)
        picks = self.by_length[(rng.integers(count) + offsets) % count]
        examples = [make_example(self.documents[i], self.tokenizer, self.noise, rng)[:2] for i in picks]
        return collate(examples, self.tokenizer.pad_token_id)


def pretrained_answer_mask_share(plm_folder: Path) -> float:
    """The embedded language model's `answer_mask_share`; 0 (random spans only) for any other BART."""
    if not (Path(plm_folder) / MANIFEST).is_file():
        return 0.0
    return float(read_manifest(plm_folder).get("params", {}).get("answer_mask_share", 0.0))
