"""Clotho v2.1 as a dataset folder: its published caption CSVs and extracted audio folders, converted to the COCO
caption format the pipeline reads, every clip checked."""

import json
import os
import re

import pytest

from mmskip.cli import main
from mmskip.data.clotho import prepare_clotho_folder
from mmskip.data.formats import read_captions, scenes_paths

HEADER = "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
PARTS = ("development", "validation", "evaluation")


def _row(name: str, i: int) -> str:
    # Clotho's captions hold commas, so the CSV quotes them
    return f'{name},"a bird sings, then stops {i}",rain falls {i},a door creaks {i},wind blows {i},"a dog, far away {i}"\n'


def _clotho(root, clips=None):
    """The published files as fetch_data leaves them: a caption CSV per part, and the extracted audio folders."""
    clips = clips or {"development": ["z last.wav", "a first.wav"], "validation": ["v.wav"], "evaluation": ["e.wav"]}
    csvs, folders = [], []
    root.mkdir(parents=True)
    for part in PARTS:
        csv = root / f"clotho_captions_{part}.csv"
        csv.write_text(HEADER + "".join(_row(name, i) for i, name in enumerate(clips[part])), encoding="utf-8")
        folder = root / "audio" / part
        folder.mkdir(parents=True)
        for name in clips[part]:
            (folder / name).write_bytes(b"RIFF" + name.encode())
        csvs.append(csv)
        folders.append(folder)
    return tuple(csvs), folders


def test_clotho_becomes_a_dataset_folder_of_clips_and_captions(tmp_path, capsys):
    csvs, folders = _clotho(tmp_path / "external")
    out = tmp_path / "data" / "clotho"
    main(["prepare_clotho", "--captions", *map(str, csvs), "--audio", *map(str, folders), "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == {"train": {"clips": 2, "captions": 10},
                                                   "val": {"clips": 1, "captions": 5},
                                                   "test": {"clips": 1, "captions": 5}}
    # development is train, validation val, evaluation test; clips numbered across the splits, by name within one
    train = read_captions(scenes_paths(out, "train")["captions"])
    assert [(e.image_id, e.file_name) for e in train] == [(1, "development/a first.wav"),
                                                          (2, "development/z last.wav")]
    assert train[0].captions == ("a bird sings, then stops 1", "rain falls 1", "a door creaks 1", "wind blows 1",
                                 "a dog, far away 1")
    assert [(e.image_id, e.file_name) for e in read_captions(scenes_paths(out, "val")["captions"])] == [
        (3, "validation/v.wav")]
    assert [(e.image_id, e.file_name) for e in read_captions(scenes_paths(out, "test")["captions"])] == [
        (4, "evaluation/e.wav")]
    # the audio folders are linked (relative links), and every clip resolves through them
    for part in PARTS:
        link = out / "audio" / part
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert (out / "audio" / "development" / "a first.wav").read_bytes() == b"RIFFa first.wav"
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "audio"]


def test_missing_clips_are_listed_and_nothing_is_written(tmp_path):
    csvs, folders = _clotho(tmp_path / "external")
    (folders[2] / "e.wav").unlink()
    out = tmp_path / "clotho"
    with pytest.raises(SystemExit, match=re.escape("1 clip(s) the caption files list are not under "
                                                   f"{out / 'audio'}:\n  evaluation/e.wav")):
        main(["prepare_clotho", "--captions", *map(str, csvs), "--audio", *map(str, folders), "--out", str(out)])
    assert not (out / "annotations").exists()
    with pytest.raises(FileNotFoundError, match=re.escape(f"--audio {tmp_path / 'nowhere'}: no such folder")):
        prepare_clotho_folder(csvs, [tmp_path / "nowhere"], tmp_path / "other")


@pytest.mark.parametrize("text, message", [
    ("file,caption_1\nx.wav,a\n", "columns ['file', 'caption_1']; expected Clotho's ['file_name', 'caption_1'"),
    (HEADER + _row("x.wav", 0) + _row("x.wav", 1), "line 3: file_name 'x.wav' is empty or repeated"),
    (HEADER + "x.wav,a,b,,d,e\n", "line 2 (x.wav): an empty caption"),
])
def test_a_caption_file_not_in_clothos_format_is_refused_naming_the_line(tmp_path, text, message):
    csvs, folders = _clotho(tmp_path / "external")
    csvs[0].write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{csvs[0]}") + ".*" + re.escape(message)):
        prepare_clotho_folder(csvs, folders, tmp_path / "clotho")
    assert not (tmp_path / "clotho" / "annotations").exists()


def _aqa(root, rows=None):
    """Clotho-AQA as fetch_data leaves it: a CSV per split (a row per annotator's answer) and audio_files/."""
    rows = rows or {"train": [("b.wav", "is it raining?", ["yes", "yes", "no"]),
                              ("a.wav", "what is barking?", ["dog", "Dog", "a dog"])],
                    "val": [("c.wav", "is there music?", ["no", "no", "no"])],
                    "test": [("d.wav", "what makes the noise?", ["car", "engine", "engine"]),
                             ("d.wav", "is it loud?", ["yes", "no", "yes"])]}
    root.mkdir(parents=True)
    (root / "audio_files").mkdir()
    csvs = []
    for split, questions in rows.items():
        lines = ["file_name,QuestionText,answer,confidence"]
        for name, question, answers in questions:
            lines += [f"{name},{question},{answer},yes" for answer in answers]
            (root / "audio_files" / name).write_bytes(b"RIFF")
        csvs.append(root / f"clotho_aqa_{split}.csv")
        csvs[-1].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tuple(csvs), root / "audio_files"


def test_clotho_aqa_becomes_a_vqa_folder_of_clips_with_the_annotators_consensus(tmp_path, capsys):
    from mmskip.data.formats import read_vqa

    csvs, audio = _aqa(tmp_path / "external")
    out = tmp_path / "data" / "clotho_aqa"
    main(["prepare_clotho_aqa", "--questions", *map(str, csvs), "--audio", str(audio), "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == {"train": {"clips": 2, "questions": 2},
                                                   "val": {"clips": 1, "questions": 1},
                                                   "test": {"clips": 1, "questions": 2}}
    paths = scenes_paths(out, "train")
    train = read_vqa(paths["vqa_questions"], paths["vqa_annotations"])
    # clips numbered by name within a split, across the splits; questions in file order; the consensus ten times
    assert [(q.question_id, q.image_id, q.multiple_choice_answer, q.question_type) for q in train] == [
        (1, 2, "yes", "yes/no"), (2, 1, "dog", "other")]
    assert all(q.answers == (q.multiple_choice_answer,) * 10 for q in train)
    annotations = json.loads(paths["vqa_annotations"].read_text())["annotations"]
    assert annotations[1]["clotho_aqa_answers"] == ["dog", "dog", "a dog"]  # lower-cased, all three kept
    test = scenes_paths(out, "test")
    assert [q.multiple_choice_answer for q in read_vqa(test["vqa_questions"], test["vqa_annotations"])] == [
        "engine", "yes"]
    assert [(i["id"], i["file_name"]) for i in json.loads(test["captions"].read_text())["images"]] == [
        (4, "audio_files/d.wav")]
    assert (out / "audio" / "audio_files").is_symlink()


def test_clotho_aqa_refuses_missing_clips_and_malformed_csvs_writing_nothing(tmp_path):
    from mmskip.data.clotho import prepare_clotho_aqa_folder

    csvs, audio = _aqa(tmp_path / "external")
    (audio / "d.wav").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 clip\(s\) the questions ask about are not under .*\n  "
                                                r"audio_files/d.wav"):
        prepare_clotho_aqa_folder(csvs, audio, tmp_path / "out")
    assert not (tmp_path / "out" / "annotations").exists()
    csvs[1].write_text("file_name,question,answer\nc.wav,is it?,yes\n")
    with pytest.raises(ValueError, match=r"clotho_aqa_val.csv: columns \['file_name', 'question', 'answer'\]; "
                                         r"expected Clotho-AQA's \['file_name', 'QuestionText', 'answer'\]"):
        prepare_clotho_aqa_folder(csvs, audio, tmp_path / "out")
    csvs[1].write_text("file_name,QuestionText,answer,confidence\nc.wav,is it?,,yes\n")
    with pytest.raises(ValueError, match=r"clotho_aqa_val.csv, line 2: an empty file_name, QuestionText or answer"):
        prepare_clotho_aqa_folder(csvs, audio, tmp_path / "out")
    with pytest.raises(ValueError, match=r"2 question files: give Clotho-AQA's 3"):
        prepare_clotho_aqa_folder(csvs[:2], audio, tmp_path / "out")
