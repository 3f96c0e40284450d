"""GQA at paper scale: its balanced question files as one split of a dataset folder in VQAv2's format.

Input: GQA's question files as published in ``questions1.2.zip`` (``mmskip fetch_data --source
gqa_questions``), for example ``val_balanced_questions.json`` (the paper's code evaluates on
``valid``) or ``testdev_balanced_questions.json``: one JSON object mapping each question id (a
string of digits) to ``{"imageId", "question", "answer", "types": {"structural", ...}, ...}``.
The images are ``images/{imageId}.jpg`` of ``images.zip`` (``--source gqa_images``).

Written like OK-VQA's (:mod:`mmskip.data.coco`): :func:`prepare_gqa_folder` (the pipeline's
``prepare_gqa`` stage) makes a whole dataset folder, train from ``train_balanced``, test from
``val_balanced``, an empty val, the images linked and checked; :func:`prepare_gqa` writes one split. A
split is VQAv2's question and annotation files and a caption file listing its images, under
``{image_folder}/`` of the folder's ``images/``. GQA has one answer per question where VQAv2 has ten: the answer is
given ten times, so the pipeline's VQA accuracy is exact match, GQA's own measure (VQAv2's
evaluation normalises only whitespace when the ten answers agree). VQAv2's ``question_type`` is
GQA's structural type (verify, query, choose, logical, compare). GQA's image ids are strings
(``2354786``, ``n161313``): the pipeline's integer ``image_id`` numbers them in sorted order, and
each image entry and annotation keeps GQA's own id as ``gqa_image_id``.
"""

from __future__ import annotations

from pathlib import Path

from mmskip.data.coco import SPLITS, write_vqa_split, write_whole_folder
from mmskip.io import read_json

FIELDS = ("imageId", "question", "answer")
ANSWERS = 10  # VQAv2's annotators per question


def read_gqa(paths: list[Path]) -> list[tuple[int, dict]]:
    """(question id, entry) of every question of GQA question files, by question id; a missing
    field, a question id that is not a number or one given twice is refused, naming it."""
    if not paths:
        raise ValueError("no question files given: pass GQA question files, e.g. val_balanced_questions.json")
    out: dict[int, dict] = {}
    for path in paths:
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a GQA question file is a JSON object of question id -> question, "
                             f"not a {type(data).__name__}")
        for qid, entry in data.items():
            if not qid.isdigit():
                raise ValueError(f"{path}: question id {qid!r} is not a number (GQA's ids are digits)")
            missing = [f for f in FIELDS if f not in entry]
            if missing:
                raise ValueError(f"{path}: question {qid} lacks {missing}; a GQA question has {list(FIELDS)}")
            if int(qid) in out:
                raise ValueError(f"{path}: question {qid} is given twice (in more than one file)")
            out[int(qid)] = entry
    return sorted(out.items())


def gqa_split(entries: list[tuple[int, dict]], image_folder: str) -> tuple[list, list, list]:
    """GQA questions (id, entry) as one split in VQAv2's format: (questions, annotations, images as
    ``{image_folder}/{imageId}.jpg``), the split's images numbered in the sorted order of GQA's ids."""
    image_ids = {gqa: i for i, gqa in enumerate(sorted({e["imageId"] for _, e in entries}))}
    qs, anns = [], []
    for qid, e in entries:
        image = image_ids[e["imageId"]]
        qs.append({"question_id": qid, "image_id": image, "question": e["question"]})
        anns.append({"question_id": qid, "image_id": image, "gqa_image_id": e["imageId"],
                     "question_type": e.get("types", {}).get("structural", "gqa"), "answer_type": "other",
                     "multiple_choice_answer": e["answer"],
                     "answers": [{"answer_id": i + 1, "answer": e["answer"]} for i in range(ANSWERS)]})
    images = [{"id": i, "gqa_image_id": gqa, "file_name": f"{image_folder}/{gqa}.jpg"} for gqa, i in image_ids.items()]
    return qs, anns, images


def _check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError(f"limit={limit}: allowed 0 (every question) or a positive count")


def prepare_gqa(questions: list[Path], split: str, out: Path, image_folder: str = "gqa", limit: int = 0) -> dict:
    """GQA question files as split ``split`` of the dataset folder ``out`` (the first ``limit``
    questions by id when ``limit`` > 0). The other splits' files in ``out`` are kept; each file
    is replaced whole, after every question was read and checked. Returns the counts."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed {list(SPLITS)}")
    _check_limit(limit)
    entries = read_gqa(questions)
    total = len(entries)
    if limit:
        entries = entries[:limit]
    qs, anns, images = gqa_split(entries, image_folder)
    write_vqa_split(out, split, qs, anns, images)
    return {"split": split, "questions": len(qs), "questions_in_files": total, "images": len(images)}


def prepare_gqa_folder(train: list[Path], test: list[Path], images: Path, out: Path, limit: int = 0) -> dict:
    """GQA as a dataset folder (the ``prepare_gqa`` stage): the ``train`` question files (train_balanced) as split
    train, the ``test`` ones (val_balanced: the paper's code evaluates on GQA's valid) as split test, an empty
    val; each split the first ``limit`` questions by id when ``limit`` > 0. ``images`` (the extracted images.zip's
    folder of ``{imageId}.jpg``) is linked under ``out/images`` and every image a kept question asks about is
    checked there. Returns the counts."""
    _check_limit(limit)
    splits, counts = {}, {}
    for split, files in (("train", train), ("test", test)):
        entries = read_gqa(files)
        kept = entries[:limit] if limit else entries
        splits[split] = gqa_split(kept, Path(images).name)
        counts[split] = {"questions": len(kept), "questions_in_files": len(entries), "images": len(splits[split][2])}
    write_whole_folder(out, splits, [Path(images)])
    return counts
