"""COCO caption metrics: the same numbers as pycocoevalcap called directly, the path without Java, the SPICE
check, the Python tokenizer against PTBTokenizer, and every bad input through the CLI."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from vlkd.cli import main
from vlkd.evaluate import caption_metric
from vlkd.evaluate.caption_metric import BLEU_KEYS, missing_spice_jars, python_tokenize, score_captions

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime")

# Image ids out of order, so a per-image mix-up would show.
REFERENCES = {
    42: ["A dog runs on the beach.", "a brown dog running along the sea", "The dog is running near the water!"],
    7: ["Two people (a man and a woman) ride bikes.", "a man and a woman on bicycles", "people's bikes on a road"],
    100: ["A red bus parked near the curb.", "a red-and-white bus at a stop", "the bus isn't moving"],
    3: ["a plate of food", "A plate with rice, beans and salad.", "dinner on a white plate"],
}
CANDIDATES = {42: "A dog running on the beach.", 7: "a man and a woman riding bikes", 100: "A bus, parked.",
              3: "a white plate with food"}
ANNOTATIONS = {"annotations": [{"image_id": image, "id": 10 * image + index, "caption": caption}
                               for image, captions in REFERENCES.items() for index, caption in enumerate(captions)]}
PREDICTIONS = [{"image_id": image, "caption": caption} for image, caption in CANDIDATES.items()]
WITHOUT_JAVA = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]


def pycocoevalcap_directly(meteor=None, tokenize=None) -> tuple[dict, dict]:
    """What COCOEvalCap.evaluate does, minus SPICE: PTB-tokenize (or `tokenize` each caption, no Java),
    then each scorer. (metrics, per-image CIDEr)."""
    if tokenize is None:
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({image: [{"caption": text} for text in texts] for image, texts in REFERENCES.items()})
        res = tokenizer.tokenize({image: [{"caption": CANDIDATES[image]}] for image in REFERENCES})
    else:
        gts = {image: [tokenize(text) for text in texts] for image, texts in REFERENCES.items()}
        res = {image: [tokenize(CANDIDATES[image])] for image in REFERENCES}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics = dict(zip(BLEU_KEYS, bleu, strict=True))
    if meteor is not None:
        metrics["METEOR"], _ = meteor.compute_score(gts, res)
    metrics["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    metrics["CIDEr"], per_image = Cider().compute_score(gts, res)
    return metrics, dict(zip(gts, per_image, strict=True))


@needs_java
def test_the_same_numbers_as_pycocoevalcap_called_directly(monkeypatch, caplog):
    from pycocoevalcap.meteor import meteor as meteor_module

    meteor = meteor_module.Meteor()  # one Java start for both sides
    monkeypatch.setattr(meteor_module, "Meteor", lambda: meteor)
    monkeypatch.setattr(caption_metric, "missing_spice_jars", lambda: [Path("stanford-corenlp-3.6.0.jar")])
    expected, expected_cider = pycocoevalcap_directly(meteor)
    with caplog.at_level(logging.WARNING):
        result = score_captions(ANNOTATIONS, PREDICTIONS)
    assert {key: result[key] for key in expected} == expected
    assert "SPICE" not in result and "SPICE left out" in caplog.text
    assert result["tokenizer"] == "PTBTokenizer" and result["images"] == 4
    assert {image: scores["CIDEr"] for image, scores in result["perImage"].items()} == expected_cider
    assert list(result["perImage"]) == list(REFERENCES)


def test_without_java_bleu_rouge_cider_remain_and_a_warning_says_why(monkeypatch, caplog):
    monkeypatch.setattr(caption_metric, "java_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        result = score_captions(ANNOTATIONS, PREDICTIONS)
    assert [key for key in result if key not in ("images", "tokenizer", "perImage")] == WITHOUT_JAVA
    assert result["tokenizer"] == "python-fallback"
    assert [record.getMessage() for record in caplog.records if "no java" in record.getMessage()] != []
    # pycocoevalcap's own BLEU, ROUGE_L and CIDEr (pure Python) over the Python tokenizer's tokens.
    expected, expected_cider = pycocoevalcap_directly(tokenize=python_tokenize)
    assert {key: result[key] for key in WITHOUT_JAVA} == expected
    assert {image: scores["CIDEr"] for image, scores in result["perImage"].items()} == expected_cider


@needs_java
def test_without_java_the_numbers_match_coco_where_the_tokenizers_agree(monkeypatch):
    expected, _ = pycocoevalcap_directly()
    result = score_captions(ANNOTATIONS, PREDICTIONS, java=False)
    assert {key: result[key] for key in WITHOUT_JAVA} == expected


@needs_java
def test_the_python_tokenizer_mimics_ptbtokenizer_on_common_punctuation():
    captions = [*CANDIDATES.values(), *(text for texts in REFERENCES.values() for text in texts),
                "Mr. Smith and the U.S. team.", "A dog's ball, \"red\" (big) -- on the mat...", "wait... what",
                "It isn't raining, can't you see?", "a 3.5 cm, 1,000 items at 10:30 for $5 & 50% off.",
                "a bus [parked] near {the} curb", "THE CAT   sat\non the mat.", "one reads: 'hello'!"]
    ptb = PTBTokenizer().tokenize({index: [{"caption": text}] for index, text in enumerate(captions)})
    assert [python_tokenize(text) for text in captions] == [ptb[index][0] for index in range(len(captions))]


def test_spice_needs_the_corenlp_jars_pycocoevalcap_would_download():
    from pycocoevalcap.spice import get_stanford_models

    lib = Path(get_stanford_models.__file__).parent / "lib"
    expected = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    assert missing_spice_jars() == [jar for jar in expected if not jar.is_file()]


def write_inputs(folder: Path, annotations=ANNOTATIONS, predictions=PREDICTIONS) -> list[str]:
    """The two input files (a str is written as is, anything else as JSON) and the CLI arguments for them."""
    paths = {"annotations": annotations, "predictions": predictions}
    for name, content in paths.items():
        (folder / f"{name}.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return [arg for name in paths for arg in (f"--{name}", str(folder / f"{name}.json"))]


def test_cli_writes_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(caption_metric, "java_available", lambda: False)  # fast; the Java path is tested above
    output = tmp_path / "out" / "metrics.json"
    result = CliRunner().invoke(main, ["caption-score", *write_inputs(tmp_path), "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "CIDEr" in result.stdout and "over 4 images" in result.stdout
    metrics = json.loads(output.read_text())
    assert sorted(metrics) == sorted([*WITHOUT_JAVA, "images", "tokenizer"])
    assert metrics["CIDEr"] == score_captions(ANNOTATIONS, PREDICTIONS, java=False)["CIDEr"]


BAD_INPUTS = {
    "malformed JSON": ({"predictions": '[{"image_id": 42, "caption": "a dog"}\n {"image_id": 7}]'},
                       "predictions.json is not valid JSON: Expecting ',' delimiter at line 2, column 2"),
    "not the COCO format": ({"annotations": [{"image_id": 42, "caption": "a dog"}]},
                            "annotations.json has no 'annotations' list"),
    "annotation without caption": ({"annotations": {"annotations": [{"image_id": 42}]}}, "annotation #0 in"),
    "unknown image ids": ({"predictions": [*PREDICTIONS, {"image_id": 5, "caption": "x"}]},
                          "1 caption(s) in"),
    "missing images": ({"predictions": PREDICTIONS[:2]}, "2 image(s) of"),
    "duplicate image ids": ({"predictions": [*PREDICTIONS, PREDICTIONS[1]]}, "image id 7 has 2 captions in"),
    "caption not a string": ({"predictions": [*PREDICTIONS[:3], {"image_id": 3, "caption": ["a", "plate"]}]},
                             "the caption for image id 3 in"),
    "prediction without image id": ({"predictions": [*PREDICTIONS, {"caption": "x"}]}, "prediction #4 in"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_inputs_give_one_line_and_exit_2(tmp_path, case):
    overrides, message = BAD_INPUTS[case]
    args = write_inputs(tmp_path, **overrides)
    result = CliRunner().invoke(main, ["caption-score", *args, "--output", str(tmp_path / "metrics.json")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("vlkd: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert not (tmp_path / "metrics.json").exists()
