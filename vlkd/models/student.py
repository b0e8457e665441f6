"""The student: a BART language model plus the two projections of VLKD.

  W_t (`text_projection`): the mean of BART's encoder output over non-pad tokens → CLIP embedding size.
  W_v (`visual_projection` + LayerNorm): CLIP image features → visual tokens of BART's width, placed as a
      prefix in front of the token embeddings at the encoder input, with the attention mask extended.
      `pooled`: the pooled image embedding [B, E] → `prefix_tokens` tokens; `patch`: the teacher's
      final-layer patch tokens [B, T, W] → T tokens.
  Where the text sits (`text_positions`): `after_prefix`, a plain concatenation, the prefix takes BART's
      positions 0..P-1 and the text P.. ; `from_start`, the text keeps the positions 0.. it had in the language
      model's pretraining and the prefix tokens carry no text position (as VL-T5/VL-BART give visual tokens
      their own embeddings), so the language model reads its text where it learnt to, with or without an image.

On disk (`Student.save_pretrained`): BART's and the tokenizer's own `save_pretrained` files, the
projections in `projections.safetensors`, and `vlkd-student.json` naming the teacher the student was
distilled from. `Student.from_pretrained(dir)` loads it all in one call.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, BartForConditionalGeneration, PreTrainedTokenizerBase

from vlkd.errors import VlkdError, first_line
from vlkd.io import write_json_atomic
from vlkd.models.infill import generate_infills

STUDENT_CONFIG = "vlkd-student.json"
PROJECTIONS = "projections.safetensors"
FORMAT = 1
TEXT_POSITIONS = ("after_prefix", "from_start")


@dataclass(frozen=True)
class StudentConfig:
    teacher: dict  # the teacher fingerprint of the features the student learns from
    embed_dim: int  # CLIP's joint embedding size (W_t's output)
    prefix: str = "pooled"  # pooled | patch
    prefix_tokens: int = 1  # visual tokens made from the pooled embedding
    visual_width: int = 0  # input width of W_v: embed_dim (pooled) or the patch tokens' width
    itcl_temperature: float = 0.01
    plm: dict = field(default_factory=dict)  # the language model's manifest (name, source, sha256)
    aligned_teacher: bool = False  # a diagnostic student: distilled with captions' text embeddings for images
    text_positions: str = "after_prefix"  # after_prefix | from_start (the module's docstring)
    format: int = FORMAT

    def __post_init__(self):
        if self.prefix not in ("pooled", "patch"):
            raise VlkdError(f"unknown prefix kind {self.prefix!r}; use pooled or patch")
        if self.text_positions not in TEXT_POSITIONS:
            raise VlkdError(f"unknown text_positions {self.text_positions!r}; use {' or '.join(TEXT_POSITIONS)}")


class Student(nn.Module):
    def __init__(self, bart: BartForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                 config: StudentConfig):
        super().__init__()
        if tokenizer.mask_token_id is None:
            raise VlkdError("the language model's tokenizer has no <mask> token; use a BART tokenizer")
        self.bart, self.tokenizer, self.config = bart, tokenizer, config
        width = bart.config.d_model
        self.text_projection = nn.Linear(width, config.embed_dim)
        tokens = config.prefix_tokens if config.prefix == "pooled" else 1
        self.visual_projection = nn.Linear(config.visual_width or config.embed_dim, width * tokens)
        self.visual_norm = nn.LayerNorm(width)
        # CLIP's convention: logits = exp(logit_scale) * cos; trainable only if ITCL's temperature is learnable.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.itcl_temperature)), requires_grad=False)

    # -- the two projections --------------------------------------------------------------------------
    def visual_prefix(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, E] pooled embeddings or [B, T, W] patch tokens → [B, P, d_model] visual tokens."""
        expected = 2 if self.config.prefix == "pooled" else 3
        if image_features.dim() != expected or image_features.shape[-1] != self.visual_projection.in_features:
            kind = "[batch, embed_dim]" if expected == 2 else "[batch, tokens, width]"
            raise VlkdError(
                f"image features of shape {tuple(image_features.shape)} do not fit the {self.config.prefix} prefix "
                f"projection, which takes {kind} with last size {self.visual_projection.in_features}; use features "
                "from the student's teacher")
        features = image_features.to(self.visual_projection.weight.dtype)
        projected = self.visual_projection(features)
        return self.visual_norm(projected.reshape(image_features.shape[0], -1, self.bart.config.d_model))

    def text_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """W_t(mean of the encoder output over non-pad tokens): the student's text in CLIP's space."""
        hidden = self.bart.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.text_projection((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))

    def encoder_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[visual prefix ; token embeddings] and the attention mask extended over the prefix."""
        encoder = self.bart.get_encoder()
        prefix = self.visual_prefix(image_features)
        embeddings = encoder.embed_tokens(input_ids)  # BART's scaled embedding
        prefix = prefix.to(embeddings.dtype)
        if self.config.text_positions == "from_start":
            # BART's encoder adds the learnt embedding of positions 0..P+T-1 to whatever it is given; taking out
            # what it will add and putting in positions 0..T-1 moves the text to where pretraining had it and
            # leaves the prefix without a text position (the module's own table: any BART's offset and size).
            count, length = prefix.shape[1], embeddings.shape[1]
            table = encoder.embed_positions(embeddings.new_zeros(1, count + length))[0].to(embeddings.dtype)
            prefix = prefix - table[:count]
            embeddings = embeddings + (table[:length] - table[count:])
        prefix_mask = attention_mask.new_ones(prefix.shape[:2])
        return torch.cat([prefix, embeddings], 1), torch.cat([prefix_mask, attention_mask], 1)

    def infilling_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                       image_features: torch.Tensor | None) -> torch.Tensor:
        """BART's denoising loss (mean over label tokens; -100 ignored), with the image prefix if given."""
        if image_features is None:
            return self.bart(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        embeds, mask = self.encoder_inputs(input_ids, attention_mask, image_features)
        return self.bart(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    def decoder_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor,
                       image_features: torch.Tensor) -> torch.Tensor:
        """The decoder's logits, teacher-forced on `decoder_input_ids`, with the image prefix in front of the text."""
        embeds, mask = self.encoder_inputs(input_ids, attention_mask, image_features)
        return self.bart(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits

    # -- generation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, image_features: torch.Tensor | None, prompts: list[str], num_beams: int = 5,
                 max_new_tokens: int = 30, forced: bool = False) -> list[str]:
        """Texts generated for `prompts` (each with a `<mask>`), with each image's prefix in front;
        `image_features` None: no prefix. BART rewrites the whole prompt with the mask filled in, so the
        budget is the prompt's length plus `max_new_tokens` for the infill (`extract_infill` cuts it out).
        `forced`: the decoder is given the prompt up to its mask and writes only the rest (`generate_texts`)."""
        device = self.text_projection.weight.device
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        if image_features is None:
            kwargs = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}
        else:
            embeds, mask = self.encoder_inputs(encoded.input_ids, encoded.attention_mask, image_features.to(device))
            kwargs = {"inputs_embeds": embeds, "attention_mask": mask}
        return generate_infills(self.bart, self.tokenizer, kwargs, prompts, num_beams, max_new_tokens, forced)

    # -- persistence ----------------------------------------------------------------------------------
    def projection_state(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()
                if not name.startswith("bart.")}

    def save_pretrained(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.bart.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        save_file(self.projection_state(), str(folder / PROJECTIONS))
        write_json_atomic(folder / STUDENT_CONFIG, asdict(self.config))

    @classmethod
    def from_pretrained(cls, folder: Path | str, device: str | torch.device = "cpu") -> Student:
        folder = Path(folder)
        config_file = folder / STUDENT_CONFIG
        if not config_file.is_file():
            raise VlkdError(f"{folder} is not a vlkd student (no {STUDENT_CONFIG}); run `vlkd distill` or check "
                            "the path")
        config = StudentConfig(**json.loads(config_file.read_text()))
        bart = BartForConditionalGeneration.from_pretrained(folder)
        student = cls(bart, AutoTokenizer.from_pretrained(folder), config)
        unexpected = student.load_state_dict(load_file(str(folder / PROJECTIONS)), strict=False).unexpected_keys
        if unexpected:
            raise VlkdError(f"{folder / PROJECTIONS} has weights the student does not know ({unexpected[0]}, ...); "
                            "it was saved by another vlkd version, distil again")
        return student.to(device).eval()

    @classmethod
    def from_language_model(cls, folder: Path, config: StudentConfig) -> Student:
        """A fresh student: the language model stage's BART and tokenizer, new projections."""
        return cls(*load_language_model(folder, "distill.plm"), config)


def load_language_model(folder: Path, setting: str) -> tuple[BartForConditionalGeneration, PreTrainedTokenizerBase]:
    """(BART, tokenizer) of a folder the language-model stage wrote; a bad folder is one line naming `setting`."""
    try:
        return BartForConditionalGeneration.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise VlkdError(f"cannot load the language model from {folder} ({first_line(err)}); "
                        f"run `vlkd plm` or check {setting}") from err


def normalized(embeddings: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeddings.float(), dim=-1)


