"""COCO caption metrics through pycocoevalcap: perfect captions, wrong captions, bad ids; every
reference counts, not only the first; values equal pycocoevalcap's own procedure run here; several
prediction sets scored together equal each scored alone.

The scored runs are module fixtures; METEOR's JVM (~10 s to start) is the process's one, shared by every call.
"""

import contextlib
import io
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from mmskip.evaluation import caption_metric
from mmskip.evaluation.caption_metric import caption_scores, caption_scores_many

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
    stdout: str  # what reached sys.stdout during the call
    log: list[str]  # messages logged by caption_metric


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run(predictions: dict[int, str]) -> Run:
    handler, logger, stdout = _ListHandler(), caption_metric.logger, io.StringIO()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stdout(stdout):
            scores = caption_scores(predictions, REFERENCES)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return Run(scores, stdout.getvalue(), handler.messages)


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


def test_one_meteor_jvm_serves_every_call_and_a_dead_one_is_replaced(matched, shuffled):
    meteor = caption_metric._meteor()
    assert caption_metric._METEOR == [meteor] and meteor.meteor_p.poll() is None  # both fixtures' calls used it
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    again = _run({image_id: refs[0] for image_id, refs in REFERENCES.items()})
    assert again.scores == matched.scores
    (replacement,) = caption_metric._METEOR
    assert replacement is not meteor and replacement.meteor_p.poll() is None
    assert meteor.meteor_p.stdin.closed and meteor.meteor_p.stdout.closed  # the dead one's pipes were closed


def test_a_job_in_the_worker_scores_with_its_meteor_and_leaves_it_when_out_of_step(matched, shuffled, tmp_path,
                                                                                    monkeypatch):
    """In a job of ``python -m mmskip.worker`` (``warm_meteor``), METEOR is the worker's JVM, used under its lock
    file: the same numbers, and no JVM of the job's own. A lock file left b"D" (a job killed during a score) sends
    the job to a JVM of its own, with the same numbers again."""
    import mmskip.worker

    caption_metric._stop_meteor()
    shared, lock = Meteor(), tmp_path / "meteor.lock"
    lock.write_bytes(b"C")
    monkeypatch.setattr(mmskip.worker, "_WARM_METEOR", (shared, lock))
    try:
        assert isinstance(caption_metric._meteor(), caption_metric._WarmMeteor)
        warm = _run({image_id: refs[0] for image_id, refs in REFERENCES.items()})
        assert warm.scores == matched.scores and lock.read_bytes() == b"C" and caption_metric._METEOR == []
        lock.write_bytes(b"D")
        ids = sorted(REFERENCES)
        own = _run({image_id: REFERENCES[next_id][0] for image_id, next_id in zip(ids, ids[1:] + ids[:1])})
        assert own.scores == shuffled.scores and lock.read_bytes() == b"D" and len(caption_metric._METEOR) == 1
    finally:
        caption_metric._close_meteor(shared)


def test_the_meteor_jvm_is_stopped_when_the_process_exits(tmp_path):
    """The exit hook kills and reaps the JVM: a stand-in process (no JVM start) takes its place here."""
    script = tmp_path / "exit.py"
    script.write_text(
        "import subprocess, threading\n"
        "from mmskip.evaluation import caption_metric\n"
        "class Standin:\n"
        "    def __init__(self):\n"
        "        self.lock = threading.Lock()\n"
        "        self.meteor_p = subprocess.Popen(['sleep', '600'], stdin=subprocess.PIPE, stdout=subprocess.PIPE,"
        " stderr=subprocess.PIPE)\n"
        "caption_metric.Meteor = Standin\n"
        "print(caption_metric._meteor().meteor_p.pid, flush=True)\n", encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


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
    ids = sorted(REFERENCES)
    runs = [{i: REFERENCES[i][0] for i in ids}, {i: REFERENCES[j][0] for i, j in zip(ids, ids[1:] + ids[:1])}]
    assert caption_scores_many(runs, REFERENCES) == [matched.scores, shuffled.scores]


# 5 images, 3-5 references each. The first reference of every image shares no word with the
# reference NON_FIRST picks, so a metric that read only references[0] would score it ~0.
VARIED_REFERENCES = {
    21: ["crimson block resting beside an azure orb", "a red cube next to a blue ball",
         "the red cube is left of the blue sphere", "red and blue shapes"],
    22: ["pair of emerald pyramids upright, grey floor beneath", "two green cones standing on the ground",
         "green cones, two of them", "two cones that are green", "a couple of green cones"],
    23: ["tiny golden drum centred", "a small yellow cylinder in the middle", "one yellow cylinder at the centre"],
    24: ["violet orbs lined up, trio", "three purple spheres in a row", "purple balls in a line, three of them",
         "a row of three purple balls"],
    25: ["huge steel crate behind little rubber hoop", "a large metal box behind a tiny ring",
         "a big shiny box and a small ring", "metal box with a ring in front of it", "a box and a ring"],
}
NON_FIRST = {21: VARIED_REFERENCES[21][1], 22: VARIED_REFERENCES[22][1], 23: VARIED_REFERENCES[23][2],
             24: VARIED_REFERENCES[24][3], 25: VARIED_REFERENCES[25][2]}
PREDICTION_SETS = {
    "non_first": NON_FIRST,
    "paraphrase": {21: "A red cube, next to a BLUE ball!", 22: "two cones on the floor", 23: "a yellow cylinder",
                   24: "three balls in a row, purple", 25: "a metal box and a ring"},
    "shuffled": {21: NON_FIRST[22], 22: NON_FIRST[23], 23: NON_FIRST[24], 24: NON_FIRST[25], 25: NON_FIRST[21]},
    "mixed": {21: "", 22: "cones", 23: "yellow yellow yellow yellow yellow cylinder", 24: VARIED_REFERENCES[24][0],
              25: "a large metal box behind a tiny ring and a cube and a ball and a cone"},
}


def _pycocoevalcap_procedure(prediction_sets: list[dict], references: dict, meteor: Meteor) -> list[dict]:
    """pycocoevalcap's ``COCOEvalCap.evaluate``, step by step: PTBTokenizer on references and on the
    predictions separately, then Bleu(4), Meteor, Rouge and Cider on the tokenised captions."""
    gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in captions] for i, captions in references.items()})
    out = []
    for predictions in prediction_sets:
        res = PTBTokenizer().tokenize({i: [{"caption": text}] for i, text in predictions.items()})
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its ratio
            bleu, _ = Bleu(4).compute_score(gts, res)
        scores = {f"BLEU-{n}": float(value) for n, value in enumerate(bleu, start=1)}
        scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        out.append(scores)
    return out


@pytest.fixture(scope="module")
def reference_procedure() -> dict[str, dict]:
    """pycocoevalcap run directly (one METEOR JVM): every prediction set, and the control of
    NON_FIRST against the first references only."""
    meteor = Meteor()
    try:
        names = list(PREDICTION_SETS)
        scored = _pycocoevalcap_procedure([PREDICTION_SETS[n] for n in names], VARIED_REFERENCES, meteor)
        (first_only,) = _pycocoevalcap_procedure(
            [NON_FIRST], {i: refs[:1] for i, refs in VARIED_REFERENCES.items()}, meteor)
    finally:
        process = meteor.meteor_p
        process.stdin.close()
        process.kill()
        process.wait()
    return {**dict(zip(names, scored, strict=True)), "non_first, first references only": first_only}


@pytest.fixture(scope="module")
def scored_alone() -> dict[str, dict]:
    return {name: caption_scores(predictions, VARIED_REFERENCES) for name, predictions in PREDICTION_SETS.items()}


def test_a_match_with_a_non_first_reference_scores_high(scored_alone, reference_procedure):
    scores, first_only = scored_alone["non_first"], reference_procedure["non_first, first references only"]
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)  # 1e-9 smoothing, as above
    assert (scores["METEOR"], scores["ROUGE-L"]) == (1.0, 1.0)
    # CIDEr-D averages over all references: one exact match among 3-5 still scores well above 1
    assert scores["CIDEr"] > 3.0
    # what a metric reading only references[0] would give: nothing (METEOR: a few synonyms)
    assert first_only["BLEU-4"] < 1e-9 and first_only["ROUGE-L"] == first_only["CIDEr"] == 0.0
    assert first_only["METEOR"] < 0.2


def test_scores_equal_pycocoevalcap_run_directly(scored_alone, reference_procedure):
    for name in PREDICTION_SETS:
        assert scored_alone[name] == reference_procedure[name], name  # to the last digit
    assert len({scores["CIDEr"] for scores in scored_alone.values()}) == len(PREDICTION_SETS)  # varied sets


def test_scoring_sets_together_equals_each_alone(scored_alone):
    names = [*PREDICTION_SETS, "non_first"]  # a set given twice scores twice the same
    together = caption_scores_many([PREDICTION_SETS[n] for n in names], VARIED_REFERENCES)
    assert together == [scored_alone[n] for n in names]
