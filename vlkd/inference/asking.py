"""How a student is asked: the evaluation's prompts, beams, token budgets and batch size. They travel with a
packaged model (vlkd-model.json), so its predictions are asked the way its scorecard was measured."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

from vlkd.errors import VlkdError

DECODINGS = ("free", "forced")


@dataclass(frozen=True)
class Asking:
    """How a student is asked: evaluate's settings of the same names (params.yaml's `evaluate`)."""

    vqa_prompt: str
    caption_prompt: str
    describe_prompt: str
    num_beams: int
    vqa_max_new_tokens: int
    caption_max_new_tokens: int
    batch_size: int
    # free: BART rewrites the whole prompt and the answer is cut out of it; forced: the decoder is given the
    # prompt up to its <mask> and writes only the answer. A model packaged before this field was asked freely.
    decoding: str = "free"

    @classmethod
    def of(cls, settings: object, where: str = "evaluate") -> Asking:
        """The fields of `settings` (EvaluateParams, or a packaged model's record as a dict) that say how to ask."""
        values = settings if isinstance(settings, dict) else vars(settings)
        missing = [f.name for f in fields(cls) if f.name not in values and f.default is MISSING]
        if missing:
            raise VlkdError(f"{where} does not say how to ask the model ({', '.join(missing)} missing); package "
                            "the model again with `vlkd package`")
        asking = cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})
        if asking.decoding not in DECODINGS:
            raise VlkdError(f"{where} asks with decoding {asking.decoding!r}; it is one of {', '.join(DECODINGS)} "
                            "(evaluate.decoding in params.yaml, or the packaged model's vlkd-model.json)")
        return asking

    def as_dict(self) -> dict:
        return asdict(self)
