"""Official VQAv2 accuracy: answer normalisation and the 10-annotator consensus score.

Source: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py (master, class
``VQAEval``: ``evaluate``, ``processPunctuation``, ``processDigitArticle``). Re-implemented from
reading that file; the tables below are the data it defines. Behaviour reproduced on purpose:

* Answers (prediction and ground truth) get newline/tab -> space and ``strip()`` always.
* The full normalisation (punctuation, lower case, number words -> digits, articles dropped,
  contractions) runs **only when the ground-truth answers are not all identical**. When all ten
  annotators typed exactly the same string, the prediction is compared to it as is: a prediction
  of ``"Yes"`` or ``"yes."`` scores 0 against ten ``"yes"``. Official numbers depend on this quirk.
* Per question, each of the n ground-truth answers is left out in turn; the prediction scores
  ``min(1, matches among the other n - 1 / 3)``, and the question scores the mean over the n.
  With 10 answers, 1/2/3/>=4 matching annotators give 0.3/0.6/0.9/1.0.

Differences from the official script: accuracies are fractions in [0, 1] and unrounded (the
official script reports ``round(100 * acc, 2)``); only per-question-type aggregation is kept.
"""

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

# Stripped when next to a space (or anywhere, if the text has a comma between digits such as
# "1,000"); otherwise replaced by a space ("t-shirt" -> "t shirt"). Periods and apostrophes are
# not in the list: periods have their own rule, apostrophes are kept for the contractions.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# A period is dropped unless a digit follows it ("3.5" and ".5" keep theirs, "yes." loses it).
# The official pattern "(?!<=\d)(\.)(?!\d)" reads as if it also guarded a preceding digit, but its
# "(?!<=" is a look-ahead for the literal "<=", never true before a ".", so this is its meaning.
# (The official call also passes re.UNICODE as sub()'s count, capping removals at 32 periods per
# answer; no VQA answer comes near that, so the cap is not reproduced.)
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# Apostrophe-less (or partly apostrophed) spellings -> the official written form. The official
# table's entries that can never fire are left out: capitalised keys ("Im", "Ive", "Id've",
# "I'dve"; words are lower-cased before lookup) and identities ("let's", "she's"). Its one
# backwards entry, "somebody'd" -> "somebodyd", is kept because it changes scores.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

# Annotators who must agree with a prediction for full credit.
_FULL_CREDIT_MATCHES = 3


def _clean_whitespace(text: str) -> str:
    """Newlines and tabs -> spaces, then strip: applied to every answer."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """Official punctuation rule (``processPunctuation``); conditions test the input text."""
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        next_to_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if strip_all or next_to_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _process_digits_articles(text: str) -> str:
    """Lower-case, number words -> digits, drop articles, expand contractions
    (``processDigitArticle``); also collapses runs of whitespace."""
    words = (_NUMBER_WORDS.get(word, word) for word in text.lower().split())
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """Full official normalisation of one answer, e.g. ``"Two dogs!"`` -> ``"2 dogs"``.

    Note that ``vqa_accuracy`` applies it only when the ground-truth answers disagree.
    """
    return _process_digits_articles(_process_punctuation(_clean_whitespace(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against its ground-truth answers (10 in VQAv2).

    Mean over the answers, each left out in turn, of
    ``min(1, number of the other answers equal to the prediction / 3)``.
    """
    if isinstance(answers, str):
        raise ValueError(f"answers must be a sequence of str, got the single string {answers!r}")
    if len(answers) == 0:
        raise ValueError("answers must hold the ground-truth answers (10 in VQAv2), got 0")
    candidate = _clean_whitespace(prediction)
    references = [_clean_whitespace(answer) for answer in answers]
    if len(set(references)) > 1:  # the official quirk: normalise only when annotators disagree
        candidate = normalize_answer(candidate)
        references = [normalize_answer(answer) for answer in references]
    matches = sum(reference == candidate for reference in references)
    credits = [
        min(1.0, (matches - (reference == candidate)) / _FULL_CREDIT_MATCHES)
        for reference in references
    ]
    return sum(credits) / len(credits)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def vqa_scores(items: Iterable[Mapping[str, object]]) -> dict[str, object]:
    """Official VQA accuracy over a set of questions.

    Each item needs ``prediction`` (str), ``answers`` (list of str) and ``question_type`` (str).
    Returns ``{"accuracy": mean over questions, "per_question_type": {type: mean over that
    type's questions}, "num_examples": n}`` with plain, unrounded floats in [0, 1].
    """
    per_type: defaultdict[str, list[float]] = defaultdict(list)
    accuracies: list[float] = []
    for index, item in enumerate(items):
        missing = {"prediction", "answers", "question_type"} - item.keys()
        if missing:
            raise ValueError(f"VQA item {index} lacks key(s) {sorted(missing)}; "
                             "each item needs prediction, answers and question_type")
        prediction, answers = item["prediction"], item["answers"]
        if not isinstance(prediction, str):
            raise ValueError(f"VQA item {index}: prediction must be a str, got {prediction!r}")
        accuracy = vqa_accuracy(prediction, answers)  # type: ignore[arg-type]
        accuracies.append(accuracy)
        per_type[str(item["question_type"])].append(accuracy)
    if not accuracies:
        raise ValueError("vqa_scores needs at least one item, got 0")
    return {
        "accuracy": _mean(accuracies),
        "per_question_type": {qtype: _mean(values) for qtype, values in sorted(per_type.items())},
        "num_examples": len(accuracies),
    }
