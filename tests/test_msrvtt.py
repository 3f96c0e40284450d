"""MSR-VTT captioning from the extracted MSRVTT.zip (Frozen in Time's layout) into a dataset folder of videos in
the COCO caption format (mmskip.data.msrvtt)."""

from __future__ import annotations

import json

import pytest

from mmskip.data.formats import read_captions, scenes_paths
from mmskip.data.msrvtt import prepare_msrvtt_folder

LISTS = {"train_list_full.txt": [3, 0, 1], "val_list_full.txt": [5], "test_list_full.txt": [2, 10],
         "train_list_jsfusion.txt": [0, 1, 3, 5], "val_list_jsfusion.txt": [2, 10]}


def extracted_msrvtt(root, videos=(0, 1, 2, 3, 5, 10), captions=3):
    """MSRVTT/ as the zip extracts: annotation/MSR_VTT.json, videos/all/video{N}.mp4 (bytes: nothing decodes them
    here), high-quality/structured-symlinks/*_list_*.txt."""
    (root / "annotation").mkdir(parents=True)
    (root / "videos" / "all").mkdir(parents=True)
    (root / "high-quality" / "structured-symlinks").mkdir(parents=True)
    annotations = [{"image_id": f"video{n}", "caption": f"clip {n} caption {i}", "id": 100 * n + i}
                   for n in (0, 1, 2, 3, 5, 10) for i in range(captions)]
    (root / "annotation" / "MSR_VTT.json").write_text(json.dumps({"images": [], "annotations": annotations}))
    for n in videos:
        (root / "videos" / "all" / f"video{n}.mp4").write_bytes(b"mp4")
    for name, ids in LISTS.items():
        (root / "high-quality" / "structured-symlinks" / name).write_text("".join(f"video{n}\n" for n in ids))
    return root


def test_msrvtts_own_split_gives_each_video_its_captions_numbered_by_video(tmp_path):
    root = extracted_msrvtt(tmp_path / "external" / "MSRVTT")
    counts = prepare_msrvtt_folder(root, tmp_path / "msrvtt")
    assert counts == {"train": {"videos": 3, "captions": 9}, "val": {"videos": 1, "captions": 3},
                      "test": {"videos": 2, "captions": 6}}
    out = tmp_path / "msrvtt"
    assert (out / "videos" / "all").is_symlink() and (out / "videos" / "all").resolve() == root / "videos" / "all"
    test = json.loads(scenes_paths(out, "test")["captions"].read_text())
    assert test["images"] == [{"id": 3, "file_name": "all/video2.mp4", "msrvtt_video_id": "video2"},
                              {"id": 11, "file_name": "all/video10.mp4", "msrvtt_video_id": "video10"}]
    assert [(c.image_id, c.captions[0]) for c in read_captions(scenes_paths(out, "train")["captions"])] == [
        (1, "clip 0 caption 0"), (2, "clip 1 caption 0"), (4, "clip 3 caption 0")]
    ids = [a["id"] for s in ("train", "val", "test")
           for a in json.loads(scenes_paths(out, s)["captions"].read_text())["annotations"]]
    assert len(set(ids)) == len(ids) == 18


def test_the_jsfusion_split_trains_on_9k_and_tests_on_1k_a_without_val(tmp_path):
    root = extracted_msrvtt(tmp_path / "MSRVTT")
    counts = prepare_msrvtt_folder(root, tmp_path / "msrvtt", split="jsfusion")
    assert {s: c["videos"] for s, c in counts.items()} == {"train": 4, "val": 0, "test": 2}


def test_missing_videos_and_uncaptioned_ones_are_refused_writing_nothing(tmp_path):
    root = extracted_msrvtt(tmp_path / "MSRVTT", videos=(0, 1, 3, 5))
    with pytest.raises(FileNotFoundError, match=r"2 video\(s\) the split lists name are not under .*\n  all/video2"
                                                r".mp4\n  all/video10.mp4"):
        prepare_msrvtt_folder(root, tmp_path / "msrvtt")
    assert not (tmp_path / "msrvtt" / "annotations").exists()
    (root / "high-quality" / "structured-symlinks" / "test_list_full.txt").write_text("video2\nvideo77\n")
    with pytest.raises(ValueError, match=r"test_list_full.txt: 1 video\(s\) without captions in MSR_VTT.json, e.g. "
                                         r"\['video77'\]"):
        prepare_msrvtt_folder(root, tmp_path / "msrvtt")
    (root / "high-quality" / "structured-symlinks" / "test_list_full.txt").write_text("video2\nclip9\n")
    with pytest.raises(ValueError, match=r"test_list_full.txt, line 2: video id 'clip9'; MSR-VTT's are video0"):
        prepare_msrvtt_folder(root, tmp_path / "msrvtt")
    with pytest.raises(ValueError, match=r"--split 'official': allowed full, jsfusion"):
        prepare_msrvtt_folder(root, tmp_path / "msrvtt", split="official")


def _qa(folder, splits=None):
    """MSRVTT-QA's three files as its publishers give them: a list of {answer, category_id, id, question, video_id}."""
    splits = splits or {"train": [(3, "what is a man doing?", "cook"), (0, "who is singing?", "woman"),
                                  (3, "how many people dance?", "two")],
                        "val": [(5, "what is shown?", "car")], "test": [(10, "where is the dog?", "park")]}
    folder.mkdir(parents=True)
    qid = 0
    for split, rows in splits.items():
        entries = []
        for video, question, answer in rows:
            entries.append({"answer": answer, "category_id": 0, "id": qid, "question": question, "video_id": video})
            qid += 1
        (folder / f"{split}_qa.json").write_text(json.dumps(entries))
    return folder


def test_msrvtt_qa_becomes_a_vqa_folder_on_the_zips_videos(tmp_path):
    from mmskip.cli import main
    from mmskip.data.formats import read_vqa

    root = extracted_msrvtt(tmp_path / "external" / "MSRVTT")
    qa = _qa(tmp_path / "qa")
    out = tmp_path / "msrvtt_qa"
    main(["prepare_msrvtt_qa", "--root", str(root), "--qa", str(qa), "--out", str(out)])
    paths = scenes_paths(out, "train")
    train = read_vqa(paths["vqa_questions"], paths["vqa_annotations"])
    # videos numbered as MSR-VTT captioning's (N + 1), questions across the splits in file order; exact match
    assert [(q.question_id, q.image_id, q.question, q.question_type) for q in train] == [
        (1, 4, "what is a man doing?", "what"), (2, 1, "who is singing?", "who"),
        (3, 4, "how many people dance?", "how")]
    assert all(q.answers == (q.multiple_choice_answer,) * 10 for q in train)
    assert [(i["id"], i["file_name"]) for i in json.loads(paths["captions"].read_text())["images"]] == [
        (1, "all/video0.mp4"), (4, "all/video3.mp4")]
    test = scenes_paths(out, "test")
    assert [(q.question_id, q.image_id, q.multiple_choice_answer) for q in read_vqa(
        test["vqa_questions"], test["vqa_annotations"])] == [(5, 11, "park")]
    assert (out / "videos" / "all").is_symlink()


def test_msrvtt_qa_refuses_missing_files_fields_and_videos_writing_nothing(tmp_path):
    from mmskip.data.msrvtt import prepare_msrvtt_qa_folder

    root = extracted_msrvtt(tmp_path / "MSRVTT", videos=(0, 1, 2, 3, 5))
    with pytest.raises(FileNotFoundError, match=r"no train_qa.json, val_qa.json, test_qa.json \(MSRVTT-QA's files"):
        prepare_msrvtt_qa_folder(root, tmp_path / "nothing", tmp_path / "out")
    qa = _qa(tmp_path / "qa")
    with pytest.raises(FileNotFoundError, match=r"1 video\(s\) the questions ask about are not under .*\n  "
                                                r"all/video10.mp4"):
        prepare_msrvtt_qa_folder(root, qa, tmp_path / "out")
    assert not (tmp_path / "out" / "annotations").exists()
    (qa / "val_qa.json").write_text(json.dumps([{"question": "what?", "video_id": 5}]))
    with pytest.raises(ValueError, match=r"val_qa.json, question 0 .*: lacks \['answer'\]"):
        prepare_msrvtt_qa_folder(root, qa, tmp_path / "out")
    (qa / "val_qa.json").write_text(json.dumps([{"question": "what?", "answer": "a", "video_id": "clip5"}]))
    with pytest.raises(ValueError, match=r"val_qa.json, question 0: video id 'clip5'; MSR-VTT's are video0"):
        prepare_msrvtt_qa_folder(root, qa, tmp_path / "out")
