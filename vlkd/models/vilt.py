"""The task student of CLIP-TD: ViLT (transformers), a vision-language transformer that reads pixels.

A ViLT folder holds what `from_pretrained` loads: the model (`ViltForMaskedLM` after pretraining, or a
task model after fine-tuning) and its processor (`ViltImageProcessor` + a BERT WordPiece tokenizer). A
real checkpoint (e.g. dandelin/vilt-b32-mlm) is such a folder or hub name; the embedded one is built
from a config and a tokenizer trained here (`tiny_config`, `train_tokenizer`).

What this module adds to transformers' ViLT is what distillation needs to read back: the hidden state of
every text token with the word it belongs to, and of every image patch at its place on the patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vlkd.errors import VlkdError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """A lower-casing BERT WordPiece tokenizer for `texts`, as `BertTokenizerFast` (the class ViltProcessor
    expects): every character (word-initial and ##continuation) and then the most frequent whole words, up to
    `vocab_size`. Not tokenizers' WordPieceTrainer: it breaks ties between equally frequent merges in its hash
    map's order, which changes from process to process, so two runs on the same captions learnt different
    pieces (and the same inputs gave other weights). Whole words with a character fallback are a WordPiece
    vocabulary too (greedy longest match), fixed by the counts alone."""
    import string
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    # ASCII letters, digits and punctuation always, so words the captions never use (a question's) are spelled
    characters = sorted({character for word in counts for character in word}
                        | set(string.ascii_lowercase + string.digits + string.punctuation))
    pieces = [*SPECIAL_TOKENS, *characters, *(f"##{character}" for character in characters)]
    frequent = [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if len(word) > 1]
    pieces += frequent[:max(0, vocab_size - len(pieces))]
    wordpiece = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(pieces)}, unk_token="[UNK]"))
    wordpiece.normalizer, wordpiece.pre_tokenizer, wordpiece.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=wordpiece, model_max_length=max_length, do_lower_case=True,
                             unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                             mask_token="[MASK]")


def tiny_config(vocab_size: int, image_size: int, patch_size: int, hidden: int, layers: int, heads: int,
                ffn_dim: int, max_length: int):
    """An untrained ViLT of the given size, every patch kept (max_image_length -1)."""
    from transformers import ViltConfig

    if image_size % patch_size:
        raise VlkdError(f"vlm.image_size {image_size} is not a multiple of vlm.patch_size {patch_size}")
    return ViltConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=ffn_dim, image_size=image_size, patch_size=patch_size,
                      max_position_embeddings=max_length, max_image_length=-1, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def image_processor(image_size: int):
    """ViLT's image processor at `image_size` (its default is 384 on the shorter side)."""
    from transformers import ViltImageProcessor

    return ViltImageProcessor(size={"shortest_edge": image_size}, size_divisor=32)


def load_processor(name: str | Path):
    from transformers import ViltProcessor

    try:
        return ViltProcessor.from_pretrained(str(name))
    except (OSError, ValueError) as err:
        raise VlkdError(f"{name} has no ViLT processor ({str(err).splitlines()[0][:160]}); run `vlkd vlm` or "
                        "name a ViLT checkpoint") from err


def pixel_values(processor, images: list[Image.Image]) -> torch.Tensor:
    """[N, 3, H, W] as the processor prepares them. The images of one call must come out the same size
    (ViLT pads to the largest otherwise, and a padded patch has no place on the grid)."""
    values = processor.image_processor([image.convert("RGB") for image in images], return_tensors="pt")
    if not bool(values["pixel_mask"].all()):
        raise VlkdError("images of different aspect ratios in one batch; resize them to one shape "
                        "(download.resize_mode)")
    return values["pixel_values"]


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    word_ids: torch.Tensor  # [N, T]: the word each token belongs to, -1 for [CLS], [SEP] and padding
    words: list[list[str]]  # each text's words, as the tokenizer's pre-tokenizer splits them

    def to(self, device: torch.device) -> TextBatch:
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device), self.word_ids.to(device),
                         self.words)


def tokenize(tokenizer, texts: list[str], max_length: int) -> TextBatch:
    """Token ids with their words: distillation's text targets are per word, since the teacher's tokenizer
    splits words differently from the student's."""
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    normalizer = tokenizer.backend_tokenizer.normalizer
    words = [[word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))] for text in texts]
    word_ids = torch.tensor([[-1 if w is None else w for w in encoded.word_ids(i)] for i in range(len(texts))])
    return TextBatch(encoded["input_ids"], encoded["attention_mask"], word_ids, words)


class PatchOrder:
    """Records where each image token of a ViLT forward pass sits on the patch grid.

    transformers' ViltEmbeddings.visual_embed returns the patches in a random order (it draws them with
    torch.multinomial, as the original ViLT samples patches) and keeps the patch index to itself; this
    wraps that method on one model instance to keep the index of the last call."""

    def __init__(self, vilt) -> None:
        self.index: torch.Tensor | None = None  # [N, P, 2]: (row, column) of each image token after [CLS]
        self.grid: tuple[int, int] | None = None
        embeddings = vilt.embeddings
        original = embeddings.visual_embed

        def recording(*args, **kwargs):
            tokens, mask, (index, size) = original(*args, **kwargs)
            self.index, self.grid = index, size
            return tokens, mask, (index, size)

        embeddings.visual_embed = recording


@dataclass
class Encoded:
    pooled: torch.Tensor  # [N, H]: ViLT's pooler output, what the task heads read
    text: torch.Tensor  # [N, T, H]
    patches: torch.Tensor  # [N, H, rows, columns]: the image tokens put back on the patch grid


def encode(vilt, order: PatchOrder, text: TextBatch, pixels: torch.Tensor) -> Encoded:
    """One ViLT forward pass (`vilt` a ViltModel whose embeddings `order` watches)."""
    out = vilt(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels,
               pixel_mask=torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.long, device=pixels.device))
    length = text.input_ids.shape[1]
    image = out.last_hidden_state[:, length + 1:]  # after the text and the image's [CLS]
    rows, columns = order.grid
    place = (order.index[..., 0] * columns + order.index[..., 1]).to(image.device)
    grid = torch.zeros(image.shape[0], rows * columns, image.shape[2], dtype=image.dtype, device=image.device)
    grid = grid.scatter(1, place[..., None].expand_as(image), image)
    patches = grid.transpose(1, 2).reshape(image.shape[0], image.shape[2], rows, columns)
    return Encoded(out.pooler_output, out.last_hidden_state[:, :length], patches)
