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
