"""A hub dataset distributed as Parquet (VQAv2 as lmms-lab/VQAv2 publishes it), read offline from a
pinned snapshot in the hub's cache layout and turned into the pipeline's dataset folder; then
LLaVA-1.5's skip grid runs on it."""

import io
import json

import datasets
import numpy as np
import pytest
from PIL import Image
from test_llava_eval import EVALUATION, PROMPTS_ALL, checkpoint, grid  # noqa: F401  (checkpoint: a fixture)

from mmskip.cli import main
from mmskip.data.formats import read_vqa, scenes_paths
from mmskip.data.hub_datasets import MissingDatasetError, prepare_hub_vqa, resolve_dataset
from mmskip.evaluation.llava import evaluate_llava
from mmskip.data.formats import split_images

REPO = "lmms-lab/VQAv2"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
QUESTIONS = [(262148000, 262148, "what color is the cube ?"), (262148001, 262148, "how many objects are there ?"),
             (393225000, 393225, "is there a small red sphere ?"), (393225001, 393225, "what shape is it ?"),
             (524291000, 524291, "are there two cubes ?")]
FEATURES = datasets.Features({
    "question_id": datasets.Value("int64"), "question": datasets.Value("string"),
    "question_type": datasets.Value("string"),
    "answers": [{"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"),
                 "answer_id": datasets.Value("int64")}],
    "multiple_choice_answer": datasets.Value("string"), "answer_type": datasets.Value("string"),
    "image_id": datasets.Value("int64"), "image": datasets.Image()})


def jpeg(image_id: int) -> bytes:
    rng = np.random.default_rng(image_id)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30 + image_id % 7, 34, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def rows(questions=QUESTIONS):
    return {
        "question_id": [q for q, _, _ in questions], "question": [t for _, _, t in questions],
        "question_type": ["what color is the" if t.startswith("what") else "how many" for _, _, t in questions],
        "answers": [[{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                     for i, a in enumerate(["red"] * 6 + ["blue"] * 4)] for _ in questions],
        "multiple_choice_answer": ["red"] * len(questions), "answer_type": ["other"] * len(questions),
        "image_id": [i for _, i, _ in questions],
        "image": [{"bytes": jpeg(i), "path": None} for _, i, _ in questions]}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The hub cache holding lmms-lab/VQAv2's validation split at COMMIT (main -> COMMIT), in two files."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    root = cache / f"datasets--{REPO.replace('/', '--')}"
    data = root / "snapshots" / COMMIT / "data"
    data.mkdir(parents=True)
    for k, part in enumerate((QUESTIONS[:3], QUESTIONS[3:])):
        name = f"validation-0000{k}-of-00002.parquet"
        datasets.Dataset.from_dict(rows(part), features=FEATURES).to_parquet(data / name)
    testdev = datasets.Dataset.from_dict(rows(QUESTIONS[:1]), features=FEATURES)
    testdev.to_parquet(data / "testdev-00000-of-00001.parquet")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return cache


def test_a_parquet_split_becomes_the_pipelines_dataset_folder(cache, tmp_path):
    snapshot = resolve_dataset(REPO, "main", cache)
    assert snapshot.name == COMMIT
    out = tmp_path / "vqav2"
    assert prepare_hub_vqa(snapshot, "validation", out) == {"split": "test", "questions": 5, "images": 3}
    paths = scenes_paths(out, "test")
    examples = read_vqa(paths["vqa_questions"], paths["vqa_annotations"])
    assert [(e.question_id, e.image_id, e.question) for e in examples] == QUESTIONS
    assert examples[0].answers == ("red",) * 6 + ("blue",) * 4 and examples[0].multiple_choice_answer == "red"
    files = split_images(out, "test")
    assert [i for i, _ in files] == [262148, 393225, 524291]  # each image once, by id
    for image_id, path in files:
        assert path.read_bytes() == jpeg(image_id) and path.suffix == ".jpg"  # the published bytes, not re-encoded
    assert prepare_hub_vqa(snapshot, "validation", tmp_path / "first3", limit=3)["questions"] == 3


def test_missing_dataset_split_and_columns_are_named(cache, tmp_path):
    with pytest.raises(MissingDatasetError, match=f"mmskip fetch_hub_dataset --id {REPO} --revision v2 --cache"):
        resolve_dataset(REPO, "v2", cache)
    snapshot = resolve_dataset(REPO, COMMIT, cache)
    with pytest.raises(FileNotFoundError, match=r"split 'train'.*splits present: \['testdev', 'validation'\]"):
        prepare_hub_vqa(snapshot, "train", tmp_path / "out")
    bad = snapshot / "data" / "broken-00000-of-00001.parquet"
    datasets.Dataset.from_dict({k: v for k, v in rows().items() if k != "question_type"},
                               features=datasets.Features({k: v for k, v in FEATURES.items()
                                                           if k != "question_type"})).to_parquet(bad)
    with pytest.raises(ValueError, match=r"columns \['question_type'\] missing"):
        prepare_hub_vqa(snapshot, "broken", tmp_path / "out")
    with pytest.raises(ValueError, match="limit=-1"):
        prepare_hub_vqa(snapshot, "validation", tmp_path / "out", limit=-1)
    assert not (tmp_path / "out").exists()


def test_llava_runs_its_grid_on_the_prepared_hub_split(cache, checkpoint, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "vqav2"
    main(["prepare_hub_vqa", "--id", REPO, "--revision", COMMIT, "--cache", str(cache), "--split", "validation",
          "--limit", "4", "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == {"id": REPO, "revision": COMMIT, "commit": COMMIT, "split": "test",
                                                   "questions": 4, "images": 2}
    path, _ = checkpoint
    run = evaluate_llava("vqa", out, str(path), tmp_path / "llava", PROMPTS_ALL, grid(modes=("skip_block",)),
                         EVALUATION, check=4)
    assert run["num_examples"] == 4 and run["check_generate"] == {"examples": 4, "equal": 4}
    metrics = json.loads((tmp_path / "llava" / "skip_block" / "metrics.json").read_text())
    assert [p["key"] for p in metrics["points"]] == ["baseline", "skip_block-generated-k2-s-1", "skip_block-all-k2-s-1"]
    assert 0 <= metrics["points"][0]["scores"]["accuracy"] <= 100
