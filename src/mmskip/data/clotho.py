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

Clotho-AQA (Lipping et al. 2022; Zenodo record 6473207) asks questions about Clotho's clips:
``clotho_aqa_{train,val,test}.csv`` (columns ``file_name, QuestionText, answer, confidence``; a row per annotator's
answer, three per question) and ``audio_files.zip`` (folder ``audio_files/`` of WAV files).
:func:`prepare_clotho_aqa_folder` writes them in VQAv2's format, as GQA's (:mod:`mmskip.data.gqa`): the answer most
of the three annotators gave, ten times, so the pipeline's VQA accuracy is exact match with it (the three kept as
``clotho_aqa_answers``); ``question_type`` is ``yes/no`` or ``other``, the two parts Clotho-AQA's authors report.
"""

from __future__ import annotations

import csv
from pathlib import Path

from mmskip.data.coco import SPLITS, check_images, link_folders, write_whole_folder
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


# ----------------------------------------------------------------------------- Clotho-AQA

AQA_COLUMNS = ("file_name", "QuestionText", "answer")  # and confidence, unread
AQA_AUDIO = "audio_files"  # the folder audio_files.zip extracts to
ANSWERS = 10  # VQAv2's annotators per question: the consensus answer is given ten times (exact match)


def read_aqa_csv(path: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """(file name, question, its annotators' answers) of a Clotho-AQA CSV (a row per annotator's answer; three
    per question), each question once in file order. A CSV without Clotho-AQA's columns or with an empty field is
    refused, naming the file and the row."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(AQA_COLUMNS) <= set(reader.fieldnames):
            raise ValueError(f"{path}: columns {reader.fieldnames}; expected Clotho-AQA's {list(AQA_COLUMNS)}")
        answers: dict[tuple[str, str], list[str]] = {}
        for line, row in enumerate(reader, start=2):
            name, question, answer = ((row[c] or "").strip() for c in AQA_COLUMNS)
            if not (name and question and answer):
                raise ValueError(f"{path}, line {line}: an empty file_name, QuestionText or answer ({row})")
            answers.setdefault((name, question), []).append(answer.lower())
    return [(name, question, tuple(given)) for (name, question), given in answers.items()]


def consensus(answers: tuple[str, ...]) -> str:
    """The answer most annotators gave (the first given among equals)."""
    return max(answers, key=lambda a: (answers.count(a), -answers.index(a)))


def clotho_aqa_splits(csvs: dict[str, Path]) -> dict[str, tuple[list, list, list]]:
    """Per split, (questions, annotations, clips) in VQAv2's format: clips numbered across the splits (by file
    name within one), questions in file order; a question is yes/no when its answer is."""
    out, next_clip, next_question = {}, 1, 1
    for split in SPLITS:
        rows = read_aqa_csv(csvs[split])
        clips = {name: next_clip + i for i, name in enumerate(sorted({name for name, _, _ in rows}))}
        next_clip += len(clips)
        questions, annotations = [], []
        for name, question, given in rows:
            answer = consensus(given)
            kind = "yes/no" if answer in ("yes", "no") else "other"
            questions.append({"question_id": next_question, "image_id": clips[name], "question": question})
            annotations.append({"question_id": next_question, "image_id": clips[name], "question_type": kind,
                                "answer_type": kind, "multiple_choice_answer": answer,
                                "answers": [{"answer_id": i + 1, "answer": answer} for i in range(ANSWERS)],
                                "clotho_aqa_answers": list(given)})
            next_question += 1
        images = [{"id": i, "file_name": f"{AQA_AUDIO}/{name}"} for name, i in clips.items()]
        out[split] = (questions, annotations, images)
    return out


def prepare_clotho_aqa_folder(questions: tuple[Path, Path, Path], audio: Path | None, out: Path) -> dict:
    """The dataset folder ``out`` from Clotho-AQA's three CSVs (train, val, test, in that order) and the extracted
    ``audio_files.zip``'s folder ``audio_files/`` (None: ``out/audio`` is already there), linked under
    ``out/audio``; every clip a question asks about is checked there (the error lists the missing), then
    ``out/annotations`` is written whole. Returns the clips and questions per split."""
    if len(questions) != len(SPLITS):
        raise ValueError(f"{len(questions)} question files: give Clotho-AQA's {len(SPLITS)}, "
                         f"clotho_aqa_{{{','.join(SPLITS)}}}.csv in that order")
    splits = clotho_aqa_splits(dict(zip(SPLITS, questions, strict=True)))
    write_whole_folder(out, splits, [audio] if audio else [], media=AUDIO, noun="clip")
    return {split: {"clips": len(splits[split][2]), "questions": len(splits[split][0])} for split in SPLITS}
