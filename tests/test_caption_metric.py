"""COCO caption metrics through pycocoevalcap: perfect captions, wrong captions, bad ids.

The two scored runs are module fixtures because METEOR's JVM takes ~10 s per call.
"""

import contextlib
import io
import logging
import shutil
from dataclasses import dataclass

import pytest

from mmskip.evaluation import caption_metric
from mmskip.evaluation.caption_metric import caption_scores

pytestmark = pytest.mark.skipif(
    shutil.which("java") is None,
    reason="Java 17 is required on PATH (pycocoevalcap's PTBTokenizer and METEOR run in java)",
)

REFERENCES = {
    1: ["a red cube next to a blue ball.", "A red cube beside a blue sphere"],
    2: ["two green cones standing on the floor", "green cones, two of them, on the ground"],
    3: ["a small yellow cylinder in the middle", "one yellow cylinder at the centre"],
    4: ["three purple spheres in a row", "purple balls lined up, three of them"],
    5: ["a large metal box behind a tiny rubber ring", "a big shiny box and a little ring"],
}
METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


@dataclass
class Run:
    scores: dict[str, float]
    meteors: list  # the Meteor scorers caption_scores created
    stdout: str  # what reached sys.stdout during the call
    log: list[str]  # messages logged by caption_metric


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run(predictions: dict[int, str]) -> Run:
    meteors: list = []

    class RecordingMeteor(caption_metric.Meteor):
        def __init__(self) -> None:
            super().__init__()
            meteors.append(self)

    handler, logger, stdout = _ListHandler(), caption_metric.logger, io.StringIO()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
            patch.setattr(caption_metric, "Meteor", RecordingMeteor)
            scores = caption_scores(predictions, REFERENCES)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return Run(scores, meteors, stdout.getvalue(), handler.messages)


@pytest.fixture(scope="module")
def matched() -> Run:
    """Each prediction equals the first reference of its image."""
    return _run({image_id: refs[0] for image_id, refs in REFERENCES.items()})


@pytest.fixture(scope="module")
def shuffled() -> Run:
    """The same captions, each assigned to the next image (all wrong)."""
    ids = sorted(REFERENCES)
    next_ids = ids[1:] + ids[:1]
    pairs = zip(ids, next_ids, strict=True)
    return _run({image_id: REFERENCES[next_id][0] for image_id, next_id in pairs})


def test_returns_plain_floats_under_metric_names(matched):
    assert list(matched.scores) == METRICS  # no SPICE unless asked
    assert all(type(value) is float for value in matched.scores.values())


def test_identical_captions_score_perfectly(matched):
    # pycocoevalcap's BLEU adds 1e-9 smoothing, so a perfect match gives 0.99999999987, not 1.
    assert matched.scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert matched.scores["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert matched.scores["ROUGE-L"] == 1.0
    assert matched.scores["METEOR"] == 1.0


def test_wrong_captions_score_strictly_lower_on_every_metric(matched, shuffled):
    for metric in METRICS:
        assert shuffled.scores[metric] < matched.scores[metric], metric


def test_cider_prefers_the_true_assignment(matched, shuffled):
    assert matched.scores["CIDEr"] > 1.0 > shuffled.scores["CIDEr"]


def test_meteor_jvm_is_stopped_before_return(matched):
    assert len(matched.meteors) == 1
    process = matched.meteors[0].meteor_p
    assert process.returncode is not None  # reaped, not left running
    assert process.stdin.closed and process.stdout.closed


def test_pycocoevalcap_prints_go_to_the_log_not_stdout(matched):
    assert matched.stdout == ""
    assert any(message.startswith("pycocoevalcap: ratio:") for message in matched.log)


def test_mismatched_ids_raise_naming_them():
    predictions = {image_id: refs[0] for image_id, refs in REFERENCES.items() if image_id != 3}
    predictions[99] = "a caption for an unknown image"
    expected = r"missing from references: \[99\]; missing from predictions: \[3\]"
    with pytest.raises(ValueError, match=expected):
        caption_scores(predictions, REFERENCES)


def test_empty_input_raises():
    with pytest.raises(ValueError, match="at least one image"):
        caption_scores({}, {})


def test_empty_reference_list_raises():
    with pytest.raises(ValueError, match="references for image 1 must be a non-empty list"):
        caption_scores({1: "a cube"}, {1: []})


def test_scoring_several_runs_at_once_equals_one_call_per_run(matched, shuffled):
    from mmskip.evaluation.caption_metric import caption_scores_many

    ids = sorted(REFERENCES)
    runs = [{i: REFERENCES[i][0] for i in ids}, {i: REFERENCES[j][0] for i, j in zip(ids, ids[1:] + ids[:1])}]
    assert caption_scores_many(runs, REFERENCES) == [matched.scores, shuffled.scores]
