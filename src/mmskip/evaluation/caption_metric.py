"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, optional SPICE) via pycocoevalcap.

Same pipeline as pycocoevalcap's ``eval.COCOEvalCap.evaluate`` (tylin/coco-caption, Python 3
package pycocoevalcap 1.2): Stanford PTBTokenizer (lower-cases, drops punctuation) on predictions
and references separately, then each scorer on the tokenised captions. CIDEr here is CIDEr-D with
document frequencies from the references of the evaluated set (so it needs several images to be
meaningful: with one image every n-gram has idf 0).

Needs ``java`` (Java 17) on PATH: PTBTokenizer, METEOR and SPICE are Java programs. Practicalities:
* METEOR starts a JVM and loads its paraphrase tables, about 10 s regardless of set size. One
  JVM serves the whole process: started on the first score, reused by every later call (the same
  numbers as a JVM per call: each score is computed from its own sets alone), started again if it
  died, and killed when the process exits (pycocoevalcap itself only kills it when the scorer
  object is garbage-collected). A job run by ``python -m mmskip.worker`` uses the worker's one JVM instead
  (``_WarmMeteor``), one score at a time, and its own if it finds that JVM out of step.
* PTBTokenizer writes a temporary file inside the installed pycocoevalcap package directory, which
  must be writable.
* SPICE (``spice=True``) downloads Stanford CoreNLP 3.6.0 (~400 MB) into the package on first use
  and starts an 8 GB JVM; it is off by default and not part of the pipeline's metrics.
* pycocoevalcap's ``print`` output is logged at DEBUG on this module's logger instead of stdout;
  the tokenizer JVM's one-line stderr note ("PTBTokenizer tokenized N tokens ...") is left alone.
"""

import atexit
import contextlib
import fcntl
import io
import logging
import threading
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from mmskip.worker import warm_meteor

logger = logging.getLogger(__name__)

CaptionId = TypeVar("CaptionId", bound=Hashable)
BLEU_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
_MAX_IDS_IN_MESSAGE = 5


def _few(ids: set[Any]) -> str:
    """A short, deterministic listing of some ids for an error message."""
    shown = sorted(ids, key=str)[:_MAX_IDS_IN_MESSAGE]
    more = f" and {len(ids) - len(shown)} more" if len(ids) > len(shown) else ""
    return f"{shown}{more}"


def _check_inputs(
    predictions: Mapping[CaptionId, str], references: Mapping[CaptionId, Sequence[str]]
) -> None:
    """Raise ValueError unless both mappings are non-empty, share ids and hold captions."""
    if not predictions and not references:
        raise ValueError("caption_scores needs at least one image, got 0")
    only_predicted = set(predictions) - set(references)
    only_referenced = set(references) - set(predictions)
    if only_predicted or only_referenced:
        raise ValueError(
            "predictions and references must have the same image ids; "
            f"missing from references: {_few(only_predicted)}; "
            f"missing from predictions: {_few(only_referenced)}"
        )
    for image_id, prediction in predictions.items():
        if not isinstance(prediction, str):
            raise ValueError(f"prediction for image {image_id!r} must be a str, got {prediction!r}")
    for image_id, captions in references.items():
        if isinstance(captions, str) or len(captions) == 0:
            raise ValueError(f"references for image {image_id!r} must be a non-empty list "
                             f"of str, got {captions!r}")


def _tokenize(captions: Mapping[CaptionId, Sequence[str]]) -> dict[CaptionId, list[str]]:
    """PTB-tokenise captions given as {id: [caption, ...]} (pycocoevalcap's input format)."""
    coco_format = {
        image_id: [{"caption": text} for text in texts] for image_id, texts in captions.items()
    }
    return PTBTokenizer().tokenize(coco_format)


@contextlib.contextmanager
def _stdout_to_log() -> Iterator[None]:
    """Send Python-level prints (pycocoevalcap's BLEU/SPICE chatter) to the logger."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                logger.debug("pycocoevalcap: %s", line.strip())


def _close_meteor(meteor: Meteor) -> None:
    """Stop METEOR's JVM and close its pipes now (as its ``__del__`` would, eventually)."""
    process = meteor.meteor_p
    with meteor.lock:
        process.stdin.close()
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


_METEOR: list[Meteor] = []  # the process's one METEOR scorer, once started
_METEOR_LOCK = threading.Lock()


class _WarmMeteor:
    """The worker's METEOR JVM (``mmskip.worker.warm_meteor``), shared by the jobs it runs: a score holds the lock
    file for its whole exchange with the JVM, and marks the file b"D" meanwhile. A file left b"D" (a job killed in
    the middle of a score), or an exchange that fails, leaves the JVM out of step: the job then scores with a JVM
    of its own (``_own_meteor``), as do the jobs after it."""

    def __init__(self, meteor: Meteor, lock_path):
        self.meteor, self.lock_path = meteor, lock_path

    def method(self) -> str:
        return "METEOR"

    def compute_score(self, gts, res):
        with open(self.lock_path, "r+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes, or the process dies
            if lock.read(1) == b"C":
                lock.seek(0)
                lock.write(b"D")
                lock.flush()
                try:
                    result = self.meteor.compute_score(gts, res)
                except (OSError, ValueError) as err:
                    logger.warning("the worker's METEOR JVM failed (%s): scoring with one of this job's own", err)
                else:
                    lock.seek(0)
                    lock.write(b"C")
                    lock.flush()
                    return result
        return _own_meteor().compute_score(gts, res)


def _meteor() -> Meteor | _WarmMeteor:
    """The worker's shared METEOR scorer in a job it runs, else the process's own (``_own_meteor``)."""
    warm = warm_meteor()
    return _own_meteor() if warm is None else _WarmMeteor(*warm)


def _own_meteor() -> Meteor:
    """The process's METEOR scorer: its JVM is started on first use (and again if it has exited), reused by every
    later score, and stopped when the process exits."""
    with _METEOR_LOCK:
        if _METEOR and _METEOR[0].meteor_p.poll() is not None:
            _close_meteor(_METEOR.pop())
        if not _METEOR:
            _METEOR.append(Meteor())
        return _METEOR[0]


@atexit.register
def _stop_meteor() -> None:
    with _METEOR_LOCK:
        while _METEOR:
            _close_meteor(_METEOR.pop())


def _run_scorer(scorer: Any, gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> Any:
    """``scorer.compute_score`` with timing logged; returns the corpus-level score."""
    start = time.perf_counter()
    score, _per_image = scorer.compute_score(gts, res)
    logger.info("%s computed in %.1f s", scorer.method(), time.perf_counter() - start)
    return score


def _spice_score(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> float:
    """SPICE score (imported lazily: may download Stanford CoreNLP on first use)."""
    from pycocoevalcap.spice.spice import Spice

    return float(_run_scorer(Spice(), gts, res))


def caption_scores(
    predictions: Mapping[CaptionId, str],
    references: Mapping[CaptionId, Sequence[str]],
    spice: bool = False,
) -> dict[str, float]:
    """Corpus-level COCO caption metrics of one predicted caption per image.

    ``predictions`` maps image id -> caption, ``references`` maps the same ids -> reference
    captions. Returns plain floats under "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", and
    "SPICE" when ``spice`` is true. Raises ValueError (naming a few ids) when the id sets
    differ, and when the input is empty or malformed.
    """
    return caption_scores_many([predictions], references, spice=spice)[0]


def caption_scores_many(
    runs: Sequence[Mapping[CaptionId, str]],
    references: Mapping[CaptionId, Sequence[str]],
    spice: bool = False,
) -> list[dict[str, float]]:
    """:func:`caption_scores` of several prediction sets against the same references.

    The same numbers as one call per set, with one tokenizer call for all of them (and the
    process's one METEOR JVM: its start-up dominates small sets).
    """
    for predictions in runs:
        _check_inputs(predictions, references)
    with _stdout_to_log():
        # one tokenizer JVM for the references and every run: it tokenises line by line
        every = _tokenize({**{("reference", image_id): list(texts) for image_id, texts in references.items()},
                           **{(r, image_id): [text] for r, predictions in enumerate(runs)
                              for image_id, text in predictions.items()}})
        gts = {image_id: every["reference", image_id] for image_id in references}
        results = [{image_id: every[r, image_id] for image_id in predictions}
                   for r, predictions in enumerate(runs)]
        out = []
        for res in results:
            scores = dict(zip(BLEU_NAMES, map(float, _run_scorer(Bleu(4), gts, res)), strict=True))
            scores["METEOR"] = float(_run_scorer(_meteor(), gts, res))
            scores["ROUGE-L"] = float(_run_scorer(Rouge(), gts, res))
            scores["CIDEr"] = float(_run_scorer(Cider(), gts, res))
            if spice:
                scores["SPICE"] = _spice_score(gts, res)
            out.append(scores)
    return out
