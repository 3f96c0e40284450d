"""Clotho v2.1 (Drossos et al. 2020; Zenodo record 4783391) as a dataset folder in the COCO caption format.

Inputs are the published files as ``mmskip fetch_data`` leaves them: ``clotho_captions_{development,
validation,evaluation}.csv`` (columns ``file_name, caption_1 ... caption_5``; one row per clip) and the
extracted ``clotho_audio_{...}.7z`` archives (folders ``development/``, ``validation/``, ``evaluation/`` of WAV
files, 44.1 kHz).

Written (:func:`prepare_clotho_folder`): ``annotations/captions_{split}.json`` in the COCO caption format the
pipeline reads for every dataset (:func:`mmskip.data.formats.read_captions`), its ``images`` being the clips
(``id``, ``file_name`` = ``{audio folder}/{file name}`` under the dataset folder's ``audio/``), five captions
each; and ``audio/{development,validation,evaluation}`` linked to the extracted folders. Development is split
train, validation val and evaluation test (DCASE's use of Clotho). Clips are numbered 1, 2, ... across the
splits in that order, by file name within a split. Every clip a CSV lists must be in its folder: the error
lists the missing, and nothing is written.
"""

from __future__ import annotations

import csv
from pathlib import Path

from mmskip.data.coco import SPLITS, check_images, link_folders
from mmskip.data.formats import AUDIO, scenes_paths
from mmskip.io import atomic_dir, write_json

CAPTIONS_PER_CLIP = 5
COLUMNS = ("file_name", *(f"caption_{i}" for i in range(1, CAPTIONS_PER_CLIP + 1)))
# the pipeline's split of each published part, and the folder its audio archive extracts to
CLOTHO_SPLITS = {"train": "development", "val": "validation", "test": "evaluation"}


def read_captions_csv(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(file name, its five captions) of every row of a Clotho caption CSV, in file order. A CSV without
    Clotho's columns, a repeated file name or an empty caption is refused, naming the file and the row."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or tuple(reader.fieldnames[:len(COLUMNS)]) != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}; expected Clotho's {list(COLUMNS)}")
        rows, seen = [], set()
        for line, row in enumerate(reader, start=2):
            name = row["file_name"]
            captions = tuple((row[c] or "").strip() for c in COLUMNS[1:])
            if not name or name in seen:
                raise ValueError(f"{path}, line {line}: file_name {name!r} is empty or repeated")
            if not all(captions):
                raise ValueError(f"{path}, line {line} ({name}): an empty caption")
            seen.add(name)
            rows.append((name, captions))
    return rows


def clotho_captions(csvs: dict[str, Path]) -> dict[str, dict]:
    """Per split (train, val, test), the COCO caption JSON of its CSV: clips numbered across the splits."""
    out, next_id, next_caption = {}, 1, 1
    for split in SPLITS:
        folder = CLOTHO_SPLITS[split]
        images, annotations = [], []
        for name, captions in sorted(read_captions_csv(csvs[split])):
            images.append({"id": next_id, "file_name": f"{folder}/{name}"})
            for caption in captions:
                annotations.append({"id": next_caption, "image_id": next_id, "caption": caption})
                next_caption += 1
            next_id += 1
        out[split] = {"images": images, "annotations": annotations}
    return out


def prepare_clotho_folder(captions: tuple[Path, Path, Path], audio_folders: list[Path], out: Path) -> dict:
    """The dataset folder ``out`` from Clotho's three caption CSVs (development, validation, evaluation, in that
    order) and the extracted audio folders (``development/``, ... as the 7z archives hold them; none: ``out/audio``
    is already there). The folders are linked under ``out/audio`` first, then every clip checked there, then
    ``out/annotations`` written whole. Returns the clips and captions per split."""
    if len(captions) != len(SPLITS):
        raise ValueError(f"{len(captions)} caption files: give Clotho's {len(SPLITS)}, "
                         f"{', '.join(CLOTHO_SPLITS[s] for s in SPLITS)} in that order")
    split_captions = clotho_captions(dict(zip(SPLITS, captions, strict=True)))
    media = out / AUDIO
    if audio_folders:
        link_folders(list(audio_folders), media, "the extracted Clotho audio archive's development/, validation/ or "
                                                 "evaluation/", flag="--audio")
    check_images(split_captions, media, "the caption files list", noun="clip")
    with atomic_dir(out / "annotations") as tmp:  # the folder appears whole or not at all
        for split in SPLITS:
            write_json(tmp / scenes_paths(out, split)["captions"].name, split_captions[split], compact=True)
    return {split: {"clips": len(split_captions[split]["images"]),
                    "captions": len(split_captions[split]["annotations"])} for split in SPLITS}
