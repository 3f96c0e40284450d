"""The procedural scene dataset: deterministic, in COCO / VQAv2 formats, every question type present."""

import hashlib
from pathlib import Path

import pytest

from mmskip.data.formats import read_captions, read_vqa, scenes_paths
from mmskip.data.scenes import QUESTION_TYPES, SPLITS, ScenesConfig, make_scenes
from mmskip.io import read_json

SMALL = ScenesConfig(image_size=48, num_train=40, num_val=10, num_test=30, num_text_scenes=20)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a") / "scenes"
    make_scenes(out, seed=3, cfg=SMALL)
    return out


def test_same_seed_gives_byte_identical_files(scenes, tmp_path):
    make_scenes(tmp_path / "scenes", seed=3, cfg=SMALL)
    assert tree_digest(tmp_path / "scenes") == tree_digest(scenes)


def test_other_seed_gives_other_scenes(scenes, tmp_path):
    make_scenes(tmp_path / "scenes", seed=4, cfg=SMALL)
    a = read_json(scenes / "scenes_train.json")["scenes"]
    b = read_json(tmp_path / "scenes" / "scenes_train.json")["scenes"]
    assert [s["description"] for s in a] != [s["description"] for s in b]


def test_coco_caption_format(scenes):
    data = read_json(scenes_paths(scenes, "test")["captions"])
    assert {"info", "images", "annotations", "licenses"} <= set(data)
    assert len(data["images"]) == SMALL.num_test
    assert {"id", "file_name", "width", "height"} <= set(data["images"][0])
    assert {"id", "image_id", "caption"} == set(data["annotations"][0])
    examples = read_captions(scenes_paths(scenes, "test")["captions"])
    assert all(len(e.captions) == 5 and len(set(e.captions)) >= 3 for e in examples)
    for e in examples:
        assert (scenes / "images" / e.file_name).is_file()


def test_vqav2_format_and_ten_answers(scenes):
    paths = scenes_paths(scenes, "train")
    q = read_json(paths["vqa_questions"])
    a = read_json(paths["vqa_annotations"])
    assert {"questions", "task_type", "data_subtype"} <= set(q)
    assert set(q["questions"][0]) == {"image_id", "question", "question_id"}
    ann = a["annotations"][0]
    assert {"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer", "answers"} <= set(ann)
    assert [x["answer_id"] for x in ann["answers"]] == list(range(1, 11))
    examples = read_vqa(paths["vqa_questions"], paths["vqa_annotations"])
    assert len(examples) == len(q["questions"])
    assert all(len(e.answers) == 10 for e in examples)
    # annotators disagree on some questions, and agree with the majority answer on most
    assert any(len(set(e.answers)) > 1 for e in examples)
    assert all(e.answers.count(e.multiple_choice_answer) >= 5 for e in examples)


def test_every_question_type_in_test_split(scenes):
    paths = scenes_paths(scenes, "test")
    kinds = {e.question_type for e in read_vqa(paths["vqa_questions"], paths["vqa_annotations"])}
    assert kinds == set(QUESTION_TYPES)


def test_ids_unique_across_splits(scenes):
    image_ids, question_ids = [], []
    for split in SPLITS:
        paths = scenes_paths(scenes, split)
        image_ids += [i["id"] for i in read_json(paths["captions"])["images"]]
        question_ids += [q["question_id"] for q in read_json(paths["vqa_questions"])["questions"]]
    assert len(image_ids) == len(set(image_ids))
    assert len(question_ids) == len(set(question_ids))


def test_objects_have_distinct_colours_and_do_not_overlap(scenes):
    for scene in read_json(scenes / "scenes_train.json")["scenes"]:
        objs = scene["objects"]
        assert SMALL.min_objects <= len(objs) <= SMALL.max_objects
        assert len({o["color"] for o in objs}) == len(objs)
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                assert ((a["x"] - b["x"]) ** 2 + (a["y"] - b["y"]) ** 2) ** 0.5 > a["radius"] + b["radius"]


@pytest.mark.parametrize("kwargs, message", [
    ({"min_objects": 4, "max_objects": 3}, "min_objects=4, max_objects=3"),
    ({"max_objects": 9}, "max_objects=9"),
    ({"image_size": 8}, "image_size=8"),
    ({"num_test": 0}, "num_test=0"),
])
def test_bad_config_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScenesConfig(**kwargs)


def test_failed_run_leaves_no_folder(tmp_path, monkeypatch):
    import mmskip.data.scenes as scenes_module

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(scenes_module, "captions_for", boom)
    with pytest.raises(RuntimeError):
        make_scenes(tmp_path / "scenes", seed=0, cfg=SMALL)
    assert list(tmp_path.iterdir()) == []
