"""The official VQA accuracy, reproduced exactly, as a pure function and as a file-to-file scorer.

Source: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py (master; Python 2 code, ported).
For each question the prediction and the human answers are cleaned (newlines and tabs to spaces, strip).
Then comes the official quirk: ONLY when the human answers disagree (more than one distinct cleaned answer)
are the humans AND the prediction normalised (punctuation, number words, articles, contractions). When
all ten humans wrote "two", the prediction "2" is compared as written and scores 0 (so do "Two" and "two.");
had one of them written "2", everything would have been normalised and "2" would score 1. Each human in
turn is left out and the prediction scores min(1, matches among the others / 3); the question's accuracy is
the mean of these. Overall, per answer type and per question type: round(100 * mean, 2), under the official
key names.

`normalize="always"` normalises every answer every time, as several toolkits do.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path

from vlkd.errors import VlkdError
from vlkd.io import write_json_atomic

log = logging.getLogger(__name__)

NORMALIZE_MODES = ("official", "always")

# The tables below are copied verbatim from vqaEval.py (VQAEval.__init__): contractions, manualMap,
# articles, periodStrip, commaStrip and punct. Keys such as "Im" or "Id've" can never match (words
# are lowercased first); that is the official behaviour too.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {  # manualMap
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ["a", "an", "the"]
# "(?!<=\d)" is a typo for a look-behind in the original; as written it is a look-ahead that never blocks,
# so every period not followed by a digit is removed. Kept as is.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!"]
# The original calls periodStrip.sub("", text, re.UNICODE): the flag lands in `count`, so at most 32 periods go.
PERIOD_STRIP_COUNT = int(re.UNICODE)

DEFAULT_SOURCES = {"questions": "questions", "annotations": "annotations", "predictions": "predictions"}


def clean_answer(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a mark touching a space (or any digit,digit in the text) is deleted,
    otherwise it becomes a space; then periods not followed by a digit go."""
    out = text
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lowercase, number words to digits, drop articles, fix contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    return process_digit_article(process_punctuation(text))


def question_accuracy(human_answers: list[dict], prediction: str, normalize: str = "official") -> float:
    """Accuracy in 0..1 of one prediction against the human answer records ({"answer", ...})."""
    humans = [dict(record, answer=clean_answer(record["answer"])) for record in human_answers]
    predicted = clean_answer(prediction)
    if normalize == "always" or len({human["answer"] for human in humans}) > 1:
        humans = [dict(human, answer=normalize_answer(human["answer"])) for human in humans]
        predicted = normalize_answer(predicted)
    scores = []
    for held_out in humans:
        # As in the original, "the others" are the records != the held-out one (answer, confidence and id).
        matches = sum(1 for other in humans if other != held_out and other["answer"] == predicted)
        scores.append(min(1, matches / 3))
    return sum(scores) / len(scores)


def percent(values: list[float]) -> float:
    """The official rounding: round(100 * mean, 2), computed in the same order."""
    return round(100 * float(sum(values)) / len(values), 2)


def aggregate(annotations: Mapping[int, dict], accuracies: Mapping[int, float]) -> dict:
    """Overall, perAnswerType and perQuestionType accuracies (in %) from per-question accuracies (0..1)."""
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for question_id, accuracy in accuracies.items():
        by_answer_type.setdefault(annotations[question_id]["answer_type"], []).append(accuracy)
        by_question_type.setdefault(annotations[question_id]["question_type"], []).append(accuracy)
    return {
        "overall": percent(list(accuracies.values())),
        "perAnswerType": {kind: percent(values) for kind, values in by_answer_type.items()},
        "perQuestionType": {kind: percent(values) for kind, values in by_question_type.items()},
    }


def score_vqa(questions: dict, annotations: dict, predictions: list, normalize: str = "official",
              sources: Mapping[str, str] | None = None) -> dict:
    """The official accuracy of `predictions` ([{"question_id", "answer"}]) on a VQA split.

    Returns {"overall", "perAnswerType", "perQuestionType"} (%, 2 decimals, the official keys), plus
    "perQuestion" ({question_id: %} as the official evalQA), "questions" (how many) and "normalize".
    `sources` names the inputs in error messages (keys "questions", "annotations", "predictions").
    """
    if normalize not in NORMALIZE_MODES:
        raise VlkdError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, not {normalize!r}")
    names = {**DEFAULT_SOURCES, **(sources or {})}
    records = annotation_records(annotations, names["annotations"])
    check_questions(questions, records, names["questions"], names["annotations"])
    answers = prediction_answers(predictions, records, names["predictions"], names["annotations"])
    accuracies = {question_id: question_accuracy(record["answers"], answers[question_id], normalize)
                  for question_id, record in records.items()}
    per_question = {question_id: round(100 * accuracy, 2) for question_id, accuracy in accuracies.items()}
    return {**aggregate(records, accuracies), "perQuestion": per_question, "questions": len(accuracies),
            "normalize": normalize}


def question_type_prior(annotations: object, where: str = DEFAULT_SOURCES["annotations"]) -> list[dict]:
    """Predictions that give every question the most frequent (normalised) human answer of its question
    type in these annotations (ties: alphabetical): the "per Q-type prior" baseline of the VQA paper (Antol et
    al. 2015, there taken from the training answers). What the question alone gets right: a model that
    is only as good as this does not use the image."""
    records = annotation_records(annotations, where)
    counts: dict[str, Counter] = defaultdict(Counter)
    for record in records.values():
        counts[record["question_type"]].update(normalize_answer(clean_answer(answer["answer"]))
                                               for answer in record["answers"])
    best = {kind: min(counter, key=lambda answer: (-counter[answer], answer)) for kind, counter in counts.items()}
    return [{"question_id": question_id, "answer": best[record["question_type"]]}
            for question_id, record in records.items()]


def score_vqa_files(questions: Path, annotations: Path, predictions: Path, output: Path,
                    normalize: str = "official") -> dict:
    """Read and check the three published-format files, score, write the summary (no perQuestion) to `output`
    atomically, and return the full result of `score_vqa`."""
    sources = {"questions": str(questions), "annotations": str(annotations), "predictions": str(predictions)}
    result = score_vqa(read_json(questions), read_json(annotations), read_json(predictions), normalize, sources)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, {key: value for key, value in result.items() if key != "perQuestion"})
    log.info("VQA accuracy %.2f over %d questions (%s normalisation) written to %s",
             result["overall"], result["questions"], normalize, output)
    return result


def read_json(path: Path) -> object:
    """Parse a JSON file; a missing or malformed file is a VlkdError naming the file (and line and column)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise VlkdError(f"{path} does not exist; check the path") from err
    except (OSError, UnicodeDecodeError) as err:
        raise VlkdError(f"{path} cannot be read as UTF-8 text ({err}); check the file") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise VlkdError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; "
                        "fix or regenerate the file") from err


def records_under(data: object, key: str, where: str, expected: str) -> list:
    """data[key] when data is an object holding a list there; otherwise a VlkdError."""
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise VlkdError(f"{where} has no '{key}' list; expected {expected}")
    return data[key]


def require_keys(record: object, keys: tuple[str, ...], what: str, where: str) -> None:
    if not isinstance(record, dict):
        raise VlkdError(f"{what} in {where} is not an object; expected one with keys {', '.join(keys)}")
    for key in keys:
        if key not in record:
            raise VlkdError(f"{what} in {where} has no '{key}'; every entry needs {', '.join(keys)}")
    for id_key in ("question_id", "image_id"):
        if id_key in keys and not isinstance(record[id_key], int | str):
            raise VlkdError(f"{what} in {where} has a {id_key} that is neither a number nor a string")


def annotation_records(annotations: object, where: str) -> dict[int, dict]:
    """{question_id: annotation}, in file order, after checking the fields the score uses."""
    records: dict[int, dict] = {}
    entries = records_under(annotations, "annotations", where, "the VQA annotation format")
    for index, entry in enumerate(entries):
        require_keys(entry, ("question_id", "question_type", "answer_type", "answers"), f"annotation #{index}", where)
        question_id = entry["question_id"]
        if question_id in records:
            raise VlkdError(f"question id {question_id} appears twice in {where}; keep one annotation per question")
        answers = entry["answers"]
        if not isinstance(answers, list) or not answers:
            raise VlkdError(f"question id {question_id} in {where} has no human answers; expected a list of 10")
        for answer in answers:
            require_keys(answer, ("answer",), f"an answer of question id {question_id}", where)
            if not isinstance(answer["answer"], str):
                raise VlkdError(f"an answer of question id {question_id} in {where} is not a string")
        records[question_id] = entry
    if not records:
        raise VlkdError(f"{where} has no annotations; nothing to score")
    return records


def check_questions(questions: object, records: Mapping[int, dict], where: str, annotations_where: str) -> None:
    """The questions file must cover exactly the annotated questions (the same split)."""
    entries = records_under(questions, "questions", where, "the VQA questions format")
    for index, entry in enumerate(entries):
        require_keys(entry, ("question_id",), f"question #{index}", where)
    asked = {entry["question_id"] for entry in entries}
    require_none(set(records) - asked, f"annotated question(s) in {annotations_where} are missing from {where}",
                  "use the questions file of the same split")
    require_none(asked - set(records), f"question(s) in {where} have no annotation in {annotations_where}",
                  "use the annotations of the same split")


def prediction_answers(predictions: object, records: Mapping[int, dict], where: str,
                       annotations_where: str) -> dict[int, str]:
    """{question_id: answer} after checking the prediction list against the annotated questions."""
    if not isinstance(predictions, list):
        raise VlkdError(f"{where} is not a list; expected [{{\"question_id\": ..., \"answer\": ...}}, ...]")
    answers: dict[int, str] = {}
    for index, entry in enumerate(predictions):
        require_keys(entry, ("question_id", "answer"), f"prediction #{index}", where)
        question_id, answer = entry["question_id"], entry["answer"]
        if not isinstance(answer, str):
            raise VlkdError(f"the prediction for question id {question_id} in {where} is not a string "
                            f"({type(answer).__name__}); write every answer as a string")
        if question_id in answers:
            count = sum(isinstance(item, dict) and item.get("question_id") == question_id for item in predictions)
            raise VlkdError(f"question id {question_id} has {count} predictions in {where}; keep one per question")
        answers[question_id] = answer
    require_none(set(answers) - set(records), f"prediction(s) in {where} are for question ids not in "
                  f"{annotations_where}", "predict on the questions of the same split")
    require_none(set(records) - set(answers), f"question(s) of {annotations_where} have no prediction in {where}",
                  "predict every question")
    return answers


def require_none(ids: set, problem: str, advice: str, id_name: str = "question id") -> None:
    """A VlkdError counting the offending ids and naming one (the smallest), when there are any."""
    if ids:
        example = min(ids, key=lambda some_id: (type(some_id).__name__, some_id))
        raise VlkdError(f"{len(ids)} {problem}, e.g. {id_name} {example!r}; {advice}")
