"""AudioCaps from the user's folders of clips (it is YouTube-only): the clips found become a dataset folder in the
COCO caption format, the missing ones are listed and counted, and bad input is refused before anything is written."""

import json
import re

import pytest

from mmskip.cli import main
from mmskip.data.audiocaps import prepare_audiocaps_folder
from mmskip.data.formats import read_captions, scenes_paths

HEADER = "audiocap_id,youtube_id,start_time,caption\n"
CSVS = {  # train: one caption per clip; val and test: several
    "train": HEADER + "11,bbb,30,a dog barks\n12,aaa,0,\"rain, then thunder\"\n13,gone,10,a car passes\n",
    "val": HEADER + "21,vvv,5,a bell rings\n22,vvv,5,bells ring twice\n",
    "test": HEADER + "31,ttt,100,birds sing\n",
}


def _audiocaps(root, csvs=CSVS):
    """The CSVs, and two folders holding the clips found: 'gone' disappeared from YouTube."""
    root.mkdir(parents=True)
    paths = []
    for split, text in csvs.items():
        (root / f"{split}.csv").write_text(text, encoding="utf-8")
        paths.append(root / f"{split}.csv")
    first, second = root / "clips_a", root / "clips_b"
    for folder, ids in ((first, ["aaa", "bbb"]), (second, ["vvv", "ttt", "bbb"])):
        folder.mkdir()
        for youtube_id in ids:
            (folder / f"Y{youtube_id}.wav").write_bytes(b"RIFF" + youtube_id.encode())
    return tuple(paths), [first, second]


def test_the_clips_found_become_a_dataset_folder_and_the_missing_are_listed(tmp_path, capsys):
    csvs, folders = _audiocaps(tmp_path / "user")
    out = tmp_path / "data" / "audiocaps"
    main(["prepare_audiocaps", "--captions", *map(str, csvs), "--audio", *map(str, folders),
          "--clip_name", "Y{youtube_id}.wav", "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == {
        "train": {"listed": 3, "evaluated": 2, "missing": 1, "captions": 2},
        "val": {"listed": 1, "evaluated": 1, "missing": 0, "captions": 2},
        "test": {"listed": 1, "evaluated": 1, "missing": 0, "captions": 1}}
    train = read_captions(scenes_paths(out, "train")["captions"])
    # by youtube id within a split; a clip in both folders is taken from the first given
    assert [(e.image_id, e.file_name, e.captions) for e in train] == [
        (1, "clips_a/Yaaa.wav", ("rain, then thunder",)), (2, "clips_a/Ybbb.wav", ("a dog barks",))]
    val = read_captions(scenes_paths(out, "val")["captions"])
    assert [(e.image_id, e.file_name, e.captions) for e in val] == [
        (3, "clips_b/Yvvv.wav", ("a bell rings", "bells ring twice"))]
    raw = json.loads(scenes_paths(out, "val")["captions"].read_text(encoding="utf-8"))
    assert [a["id"] for a in raw["annotations"]] == [21, 22]  # AudioCaps' own caption ids
    missing = json.loads((out / "annotations" / "missing_train.json").read_text(encoding="utf-8"))
    assert missing == {"missing": [{"youtube_id": "gone", "start_time": 10, "file": "Ygone.wav"}]}
    assert (out / "audio" / "clips_b" / "Yttt.wav").read_bytes() == b"RIFFttt"


def test_a_split_with_no_clip_found_is_refused_and_nothing_is_written(tmp_path):
    csvs, folders = _audiocaps(tmp_path / "user")
    out = tmp_path / "audiocaps"
    with pytest.raises(SystemExit, match=re.escape(f"mmskip prepare_audiocaps: {csvs[0]}: none of its 3 clips is in "
                                                   f"{folders[0]}, {folders[1]} as '{{youtube_id}}.wav' "
                                                   "(e.g. aaa.wav)")):
        main(["prepare_audiocaps", "--captions", *map(str, csvs), "--audio", *map(str, folders),
              "--clip_name", "{youtube_id}.wav", "--out", str(out)])
    assert not (out / "annotations").exists()


@pytest.mark.parametrize("template", ["{caption}.wav", "{start_time}.wav", "clips/{youtube_id}.wav", "{ytid}.wav"])
def test_a_clip_name_template_is_checked_before_anything_is_read(tmp_path, template):
    with pytest.raises(ValueError, match=re.escape(f"--clip_name {template!r}: a file name using {{youtube_id}}")):
        prepare_audiocaps_folder((tmp_path / "a.csv",) * 3, [tmp_path], template, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("youtube_id,caption\nx,a\n", "columns ['youtube_id', 'caption']; expected AudioCaps'"),
    (HEADER + "eleven,x,0,a\n", "line 2: audiocap_id 'eleven' and start_time '0' must be numbers"),
    (HEADER + "1,x,0,a\n1,y,0,b\n", "line 3: audiocap_id 1 repeated, or an empty caption or youtube_id"),
])
def test_a_csv_not_in_audiocaps_format_is_refused_naming_the_line(tmp_path, text, message):
    csvs, folders = _audiocaps(tmp_path / "user", {**CSVS, "val": text})
    with pytest.raises(ValueError, match=re.escape(f"{csvs[1]}") + ".*" + re.escape(message)):
        prepare_audiocaps_folder(csvs, folders, "Y{youtube_id}.wav", tmp_path / "out")
    assert not (tmp_path / "out").exists()
