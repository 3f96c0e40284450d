"""AudioCaps (Kim et al. 2019) from a folder of clips the user provides, in the COCO caption format.

AudioCaps is distributed as YouTube ids only (github.com/cdjkim/audiocaps: ``train.csv``, ``val.csv``,
``test.csv``, columns ``audiocap_id, youtube_id, start_time, caption``; one row per caption, five per clip in
val and test, one in train), and many of its videos have disappeared, so no download stage can fetch it. The
user points to the folders of clips they have (``--audio``), and names their files with ``--clip_name``, a
template over the CSV's columns (``{youtube_id}.wav``, ``Y{youtube_id}.wav``, ``{youtube_id}_{start_time}.wav``,
...).

Written (:func:`prepare_audiocaps_folder`): ``annotations/captions_{split}.json`` in the COCO caption format, its
``images`` being the clips found (``id``: numbered across train, val and test, in that order, by youtube id
and start time within a split; ``file_name``: ``{folder}/{file}`` under the dataset folder's ``audio/``,
where the folders are linked) with every caption of theirs (``id`` = ``audiocap_id``); and
``annotations/missing_{split}.json``, the clips the CSV lists that no folder holds. The counts printed say how
many clips each split lists and how many are evaluated. A split of which no clip is found is refused.
"""

from __future__ import annotations

import csv
import string
from pathlib import Path

from mmskip.data.coco import SPLITS, link_folders
from mmskip.data.formats import AUDIO, scenes_paths
from mmskip.io import atomic_dir, write_json

COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")


def check_clip_name(template: str) -> None:
    """A file name template may use the CSV's columns but the caption, and must use youtube_id."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    allowed = set(COLUMNS) - {"caption"}
    if fields - allowed or "youtube_id" not in fields or "/" in template:
        raise ValueError(f"--clip_name {template!r}: a file name using {{youtube_id}} and, if needed, "
                         f"{{start_time}} or {{audiocap_id}} (fields {sorted(fields)}; allowed {sorted(allowed)}), "
                         "e.g. '{youtube_id}.wav' or 'Y{youtube_id}.wav'")


def read_audiocaps_csv(path: Path) -> dict[tuple[str, int], list[tuple[int, str]]]:
    """(youtube id, start time) -> its (audiocap id, caption) rows, from an AudioCaps CSV; a CSV without
    AudioCaps' columns, a non-numeric id or start time, a repeated audiocap id or an empty caption is refused,
    naming the file and the line."""
    clips: dict[tuple[str, int], list[tuple[int, str]]] = {}
    seen: set[int] = set()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(COLUMNS) <= set(reader.fieldnames):
            raise ValueError(f"{path}: columns {reader.fieldnames}; expected AudioCaps' {list(COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            try:
                audiocap_id, start = int(row["audiocap_id"]), int(float(row["start_time"]))
            except ValueError:
                raise ValueError(f"{path}, line {line}: audiocap_id {row['audiocap_id']!r} and start_time "
                                 f"{row['start_time']!r} must be numbers") from None
            caption = (row["caption"] or "").strip()
            if audiocap_id in seen or not caption or not row["youtube_id"]:
                raise ValueError(f"{path}, line {line}: audiocap_id {audiocap_id} repeated, or an empty caption "
                                 "or youtube_id")
            seen.add(audiocap_id)
            clips.setdefault((row["youtube_id"], start), []).append((audiocap_id, caption))
    return clips


def prepare_audiocaps_folder(captions: tuple[Path, Path, Path], audio_folders: list[Path], clip_name: str,
                             out: Path) -> dict:
    """The dataset folder ``out`` from AudioCaps' three CSVs (train, val, test, in that order) and the folders of
    clips the user has (linked under ``out/audio``; each clip looked for in them in order); returns, per split,
    the clips listed, found (evaluated) and captions written."""
    check_clip_name(clip_name)
    if len(captions) != len(SPLITS):
        raise ValueError(f"{len(captions)} caption files: give AudioCaps' train.csv, val.csv and test.csv, in that "
                         "order")
    if not audio_folders:
        raise ValueError("no --audio folder: AudioCaps' clips come from YouTube; give the folders that hold them")
    listed = {split: read_audiocaps_csv(path) for split, path in zip(SPLITS, captions, strict=True)}
    media = out / AUDIO
    link_folders(list(audio_folders), media, "a folder of AudioCaps clips", flag="--audio")
    names = [folder.name for folder in audio_folders]
    data, missing, counts, next_id = {}, {}, {}, 1
    for split in SPLITS:
        images, annotations, absent = [], [], []
        for (youtube_id, start), rows in sorted(listed[split].items()):
            file = clip_name.format(youtube_id=youtube_id, start_time=start, audiocap_id=rows[0][0])
            where = next((name for name in names if (media / name / file).is_file()), None)
            if where is None:
                absent.append({"youtube_id": youtube_id, "start_time": start, "file": file})
                continue
            images.append({"id": next_id, "file_name": f"{where}/{file}"})
            annotations += [{"id": audiocap_id, "image_id": next_id, "caption": caption}
                            for audiocap_id, caption in rows]
            next_id += 1
        if not images:
            raise FileNotFoundError(f"{captions[SPLITS.index(split)]}: none of its {len(listed[split])} clips is in "
                                    f"{', '.join(map(str, audio_folders))} as {clip_name!r} (e.g. {absent[0]['file']})")
        data[split], missing[split] = {"images": images, "annotations": annotations}, absent
        counts[split] = {"listed": len(listed[split]), "evaluated": len(images), "missing": len(absent),
                         "captions": len(annotations)}
    with atomic_dir(out / "annotations") as tmp:  # the folder appears whole or not at all
        for split in SPLITS:
            write_json(tmp / scenes_paths(out, split)["captions"].name, data[split], compact=True)
            write_json(tmp / f"missing_{split}.json", {"missing": missing[split]}, compact=True)
    return counts
