"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) through pycocoevalcap, as COCO computes them.

We call pycocoevalcap's PTBTokenizer and scorers directly, in the order and with the arguments of its
COCOEvalCap.evaluate, instead of going through COCOEvalCap: that class needs pycocotools COCO objects and always
runs SPICE, whose first use downloads Stanford CoreNLP. Values are on pycocoevalcap's scale (0..1; CIDEr can
exceed 1) under its key names.

Java runs the PTB tokenizer, METEOR and SPICE. SPICE is left out (one warning) while the CoreNLP jars it would
download are missing. Without Java, METEOR and SPICE are left out and a pure-Python approximation of the PTB
tokenizer is used (one warning): BLEU, ROUGE_L and CIDEr are still reported, possibly slightly off COCO's.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as spice_models
from pycocoevalcap.tokenizer import ptbtokenizer
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

from vlkd.data.vqa_metric import read_json, records_under, require_keys, require_none
from vlkd.errors import VlkdError
from vlkd.io import write_json_atomic

log = logging.getLogger(__name__)

BLEU_KEYS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]
DEFAULT_SOURCES = {"annotations": "annotations", "predictions": "predictions"}

# What PTBTokenizer -lowerCase makes of some marks. pycocoevalcap drops only the upper-case bracket forms, so
# "-lrb-" and the like stay in the tokenized captions, as in COCO's own scores; quotes become `` or '' and go.
MARK_TOKENS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}
LEADING_MARKS = "\"'`([{$#"
TRAILING_MARKS = "\"')]}.,;:!?%"
CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs"}


def java_available() -> bool:
    """Whether a Java runtime is on PATH (tests monkeypatch this to simulate a machine without one)."""
    return shutil.which("java") is not None


def missing_spice_jars() -> list[Path]:
    """The Stanford CoreNLP jars pycocoevalcap's Spice() would download on first use, where absent."""
    lib = Path(spice_models.SPICEDIR) / spice_models.SPICELIB
    jars = [lib / f"{spice_models.JAR}.jar", lib / f"{spice_models.JAR}-models.jar"]
    return [jar for jar in jars if not jar.is_file()]


def python_tokenize(caption: str) -> str:
    """An approximation of PTBTokenizer -lowerCase followed by pycocoevalcap's punctuation removal."""
    tokens: list[str] = []
    for word in caption.replace("\n", " ").lower().split():
        tokens += _split_word(word)
    return " ".join(token for token in tokens if token not in PUNCTUATIONS)


def _split_word(word: str) -> list[str]:
    leading, trailing = [], []
    while word and word[0] in LEADING_MARKS:
        leading.append(word[0])
        word = word[1:]
    while word and word[-1] in TRAILING_MARKS and not _keeps_period(word):
        if word.endswith("..."):
            trailing.insert(0, "...")
            word = word[:-3]
        else:
            trailing.insert(0, word[-1])
            word = word[:-1]
    clitic = CLITIC.match(word)
    middle = list(clitic.groups()) if clitic else [word] if word else []
    return [MARK_TOKENS.get(mark, mark) for mark in leading] + middle + [MARK_TOKENS.get(m, m) for m in trailing]


def _keeps_period(word: str) -> bool:
    """PTB keeps the period of abbreviations: "mr.", "u.s.", "f."."""
    stem = word[:-1]
    return (word.endswith(".") and not word.endswith("...")
            and ("." in stem or stem in ABBREVIATIONS or (len(stem) == 1 and stem.isalpha())))


def tokenize(captions: Mapping[object, list[str]], java: bool) -> dict[object, list[str]]:
    """{image_id: [caption, ...]} tokenized like COCO (PTBTokenizer), or by the Python fallback without Java."""
    if java:
        try:
            return PTBTokenizer().tokenize({image: [{"caption": text} for text in texts]
                                            for image, texts in captions.items()})
        except OSError as err:  # it writes its input next to its jar, inside the installed package
            raise VlkdError(f"pycocoevalcap's PTBTokenizer could not run ({err}); it needs java on PATH and a "
                            f"writable {Path(ptbtokenizer.__file__).parent}") from err
    return {image: [python_tokenize(text) for text in texts] for image, texts in captions.items()}


def scorers(java: bool, spice: bool) -> list[tuple[object, str | list[str]]]:
    """(scorer, key or keys) in COCOEvalCap's order, without the ones this machine cannot run."""
    chosen: list[tuple[object, str | list[str]]] = [(Bleu(4), BLEU_KEYS)]
    if java:
        chosen.append((_meteor(), "METEOR"))
    chosen += [(Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    if spice:
        from pycocoevalcap.spice.spice import Spice

        chosen.append((Spice(), "SPICE"))
    return chosen


@functools.cache
def _meteor():
    """One METEOR scorer per process: it starts a Java process that loads its paraphrase tables (seconds),
    and an evaluation scores captions under each condition; the scorer serves its calls one at a time."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def score_captions(annotations: dict, predictions: list, java: bool | None = None,
                   sources: Mapping[str, str] | None = None) -> dict:
    """COCO caption metrics of `predictions` ([{"image_id", "caption"}]) against COCO caption `annotations`.

    Returns the metrics under pycocoevalcap's keys, "images" (how many), "tokenizer" (which one ran) and
    "perImage" ({image_id: {metric: value}}). `java=None` looks for a Java runtime; `sources` names the inputs
    in error messages (keys "annotations", "predictions").
    """
    names = {**DEFAULT_SOURCES, **(sources or {})}
    references = reference_captions(annotations, names["annotations"])
    candidates = predicted_captions(predictions, references, names["predictions"], names["annotations"])
    java = java_available() if java is None else java
    spice = java and _spice_usable()
    if not java:
        log.warning("no java on PATH: METEOR and SPICE left out and captions tokenized by a pure-Python "
                    "approximation of PTBTokenizer (BLEU, ROUGE_L, CIDEr may differ slightly from COCO's); "
                    "install a Java runtime for the official numbers")
    gts = tokenize(references, java)
    res = tokenize({image: [candidates[image]] for image in references}, java)
    result: dict = {}
    per_image: dict = {image: {} for image in references}
    for scorer, keys in scorers(java, spice):
        score, scores = _compute(scorer, gts, res)
        images = sorted(gts) if keys == "SPICE" else list(gts)  # Spice scores the images in sorted order
        for key, value, values in _by_key(keys, score, scores):
            result[key] = float(value)
            for image, image_value in zip(images, values, strict=True):
                per_image[image][key] = _as_float(image_value)
    return {**result, "images": len(references), "tokenizer": "PTBTokenizer" if java else "python-fallback",
            "perImage": per_image}


def score_caption_files(annotations: Path, predictions: Path, output: Path, java: bool | None = None) -> dict:
    """Read and check the files, score, write the metrics (no perImage) to `output` atomically; return them all."""
    sources = {"annotations": str(annotations), "predictions": str(predictions)}
    result = score_captions(read_json(annotations), read_json(predictions), java, sources)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, {key: value for key, value in result.items() if key != "perImage"})
    log.info("caption metrics over %d images written to %s", result["images"], output)
    return result


def _spice_usable() -> bool:
    missing = missing_spice_jars()
    if missing:
        log.warning("SPICE left out: the Stanford CoreNLP jars %s are missing in %s (pycocoevalcap downloads them "
                    "on first use, which needs internet); run `python -m pycocoevalcap.spice.get_stanford_models` "
                    "once where there is internet", ", ".join(jar.name for jar in missing), missing[0].parent)
    return not missing


def _compute(scorer, gts: dict, res: dict):
    if isinstance(scorer, Bleu):
        return scorer.compute_score(gts, res, verbose=0)  # verbose=1, COCO's default, prints to stdout
    return scorer.compute_score(gts, res)


def _by_key(keys: str | list[str], score, scores):
    """(key, corpus value, per-image values) for a scorer that gives one metric or a list (BLEU-1..4)."""
    if isinstance(keys, list):
        return zip(keys, score, scores, strict=True)
    return [(keys, score, scores)]


def _as_float(value) -> float:
    """A per-image value as a float; SPICE gives a dict per image, whose "All" F-score is the metric."""
    return float(value["All"]["f"]) if isinstance(value, dict) else float(value)


def reference_captions(annotations: object, where: str) -> dict[object, list[str]]:
    """{image_id: [reference caption, ...]} in file order, after checking every entry."""
    references: dict[object, list[str]] = {}
    for index, entry in enumerate(records_under(annotations, "annotations", where, "the COCO captions format")):
        require_keys(entry, ("image_id", "caption"), f"annotation #{index}", where)
        if not isinstance(entry["caption"], str):
            raise VlkdError(f"annotation #{index} (image id {entry['image_id']}) in {where} has a caption that is "
                            "not a string")
        references.setdefault(entry["image_id"], []).append(entry["caption"])
    if not references:
        raise VlkdError(f"{where} has no annotations; nothing to score")
    return references


def predicted_captions(predictions: object, references: Mapping[object, list[str]], where: str,
                       annotations_where: str) -> dict[object, str]:
    """{image_id: caption} after checking the result list against the annotated images."""
    if not isinstance(predictions, list):
        raise VlkdError(f"{where} is not a list; expected [{{\"image_id\": ..., \"caption\": ...}}, ...]")
    captions: dict[object, str] = {}
    for index, entry in enumerate(predictions):
        require_keys(entry, ("image_id", "caption"), f"prediction #{index}", where)
        image, caption = entry["image_id"], entry["caption"]
        if not isinstance(caption, str):
            raise VlkdError(f"the caption for image id {image} in {where} is not a string "
                            f"({type(caption).__name__}); write every caption as a string")
        if image in captions:
            count = sum(isinstance(item, dict) and item.get("image_id") == image for item in predictions)
            raise VlkdError(f"image id {image} has {count} captions in {where}; keep one per image")
        captions[image] = caption
    require_none(set(captions) - set(references), f"caption(s) in {where} are for image ids not in "
                 f"{annotations_where}", "caption the images of the same split", id_name="image id")
    require_none(set(references) - set(captions), f"image(s) of {annotations_where} have no caption in {where}",
                 "caption every image", id_name="image id")
    return captions
