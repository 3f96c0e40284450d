"""COCO at paper scale: the Karpathy split as the COCO caption JSON the pipeline reads, and VQAv2
divided along the same images.

Inputs are the published files as they are downloaded (``mmskip fetch_data``):

- Karpathy's ``dataset_coco.json`` (``caption_datasets.zip``): ``images``, each with ``filepath``
  (``train2014``/``val2014``), ``filename``, ``cocoid``, ``split`` (``train``, ``restval``,
  ``val``, ``test``) and ``sentences`` (``raw`` and ``sentid``);
- VQAv2's questions (``{"questions": [{"image_id", "question", "question_id"}]}``) and
  annotations (``{"annotations": [{"question_id", "image_id", "answers", "multiple_choice_answer",
  "question_type", ...}]}``), train and val.

Written (:func:`prepare_coco`) into a dataset folder laid out as the embedded default's scenes
(:func:`mmskip.data.formats.scenes_paths`): ``annotations/captions_{split}.json`` (COCO caption
format: ``images`` with ``id`` = ``cocoid`` and ``file_name`` = ``filepath/filename``, under the
folder's ``images/``; ``annotations`` with ``id`` = ``sentid``) and
``annotations/vqa_{questions,annotations}_{split}.json``. As in the paper's code, ``restval`` is
folded into ``train``. A VQAv2 question goes to the split of its image, so no test image is seen
in training under either task; questions on images outside the Karpathy split are dropped, and
counted.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmskip.data.formats import scenes_paths
from mmskip.io import atomic_dir, read_json, write_json

SPLITS = ("train", "val", "test")
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def karpathy_image_splits(karpathy: dict) -> dict[int, str]:
    """COCO image id -> the pipeline split of the Karpathy split (restval counted as train)."""
    out = {}
    for image in karpathy["images"]:
        split = image["split"]
        if split not in KARPATHY_SPLITS:
            raise ValueError(f"Karpathy image {image.get('cocoid')}: split {split!r}; allowed {sorted(KARPATHY_SPLITS)}")
        out[image["cocoid"]] = KARPATHY_SPLITS[split]
    return out


def karpathy_captions(karpathy: dict) -> dict[str, dict]:
    """Per split, the COCO caption JSON of the Karpathy split."""
    splits = karpathy_image_splits(karpathy)
    out = {split: {"images": [], "annotations": []} for split in SPLITS}
    for image in sorted(karpathy["images"], key=lambda i: i["cocoid"]):
        split = splits[image["cocoid"]]
        out[split]["images"].append({"id": image["cocoid"], "file_name": f"{image['filepath']}/{image['filename']}"})
        for sentence in image["sentences"]:
            out[split]["annotations"].append({"id": sentence["sentid"], "image_id": image["cocoid"],
                                              "caption": sentence["raw"].strip()})
    return out


def vqa_by_image_split(questions: list[dict], annotations: list[dict], image_split: dict[int, str]
                       ) -> tuple[dict[str, tuple[dict, dict]], int]:
    """Per split, VQAv2 (questions, annotations) JSONs of the questions whose image is in that
    split, and how many questions were dropped (their image is in no split)."""
    by_id = {a["question_id"]: a for a in annotations}
    out = {split: ({"questions": []}, {"annotations": []}) for split in SPLITS}
    dropped = 0
    for q in sorted(questions, key=lambda q: q["question_id"]):
        split = image_split.get(q["image_id"])
        if split is None:
            dropped += 1
            continue
        if q["question_id"] not in by_id:
            raise ValueError(f"VQAv2 question {q['question_id']} has no annotation")
        out[split][0]["questions"].append(q)
        out[split][1]["annotations"].append(by_id[q["question_id"]])
    return out, dropped


def missing_images(captions: dict[str, dict], images: Path) -> list[str]:
    """The files the caption JSONs of every split list that are not under ``images``."""
    return [i["file_name"] for split in SPLITS for i in captions[split]["images"]
            if not (images / i["file_name"]).is_file()]


def check_images(captions: dict[str, dict], images: Path, which: str, noun: str = "image") -> None:
    """Refuse, listing them (the first 20), the files (``noun``: image, clip) the splits' caption JSONs list that
    are not under ``images``."""
    missing = missing_images(captions, images)
    if missing:
        shown = "\n".join(f"  {m}" for m in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise FileNotFoundError(f"{len(missing)} {noun}(s) {which} are not under {images}:\n{shown}{more}")


def link_images(folders: list[Path], images: Path) -> None:
    """``images/<name>`` -> each folder (``train2014``, ``val2014`` as extracted), as relative links."""
    link_folders(folders, images, "the extracted COCO image zip's train2014/ or val2014/", flag="--images")


def link_folders(folders: list[Path], media: Path, what: str, flag: str) -> None:
    """``media/<name>`` -> each folder (as extracted), as relative links; ``what`` and ``flag`` name them when one
    is missing."""
    media.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{flag} {folder}: no such folder ({what})")
        link = media / folder.name
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise FileExistsError(f"{link} exists and is not a link: remove it or leave {flag} out")
        link.symlink_to(Path(os.path.relpath(folder.resolve(), media.resolve())), target_is_directory=True)


def prepare_coco(karpathy_json: Path, vqa_questions: list[Path], vqa_annotations: list[Path], out: Path,
                 image_folders: list[Path] = ()) -> dict:
    """Write the dataset folder's ``annotations`` (whole, atomically; the images are extracted
    under ``out/images``); returns the counts per split and the dropped questions. ``image_folders``
    (the extracted ``train2014``/``val2014``) are linked under ``out/images`` first; then every image the
    split lists must be there (they are checked whenever ``out/images`` exists): the error lists the missing."""
    karpathy = read_json(karpathy_json)
    captions = karpathy_captions(karpathy)
    if image_folders:
        link_images(list(image_folders), out / "images")
    if (out / "images").is_dir():
        check_images(captions, out / "images", "of Karpathy's split")
    questions = [q for path in vqa_questions for q in read_json(path)["questions"]]
    annotations = [a for path in vqa_annotations for a in read_json(path)["annotations"]]
    vqa, dropped = vqa_by_image_split(questions, annotations, karpathy_image_splits(karpathy))
    counts = {"dropped_questions": dropped}
    with atomic_dir(out / "annotations") as tmp:  # the folder appears whole or not at all
        for split in SPLITS:
            paths = scenes_paths(out, split)
            write_json(tmp / paths["captions"].name, captions[split], compact=True)
            write_json(tmp / paths["vqa_questions"].name, vqa[split][0], compact=True)
            write_json(tmp / paths["vqa_annotations"].name, vqa[split][1], compact=True)
    for split in SPLITS:
        counts[split] = {"images": len(captions[split]["images"]), "captions": len(captions[split]["annotations"]),
                         "questions": len(vqa[split][0]["questions"])}
    return counts


def majority_answer(answers: list[dict]) -> str:
    """The most frequent of the annotators' answers (the first given among equals): VQAv2's
    ``multiple_choice_answer`` where a dataset in its format omits it (OK-VQA)."""
    counts: dict[str, int] = {}
    for a in answers:
        counts[a["answer"]] = counts.get(a["answer"], 0) + 1
    return max(counts, key=counts.get)  # dicts keep insertion order: ties go to the first given


def write_vqa_split(out: Path, split: str, questions: list[dict], annotations: list[dict], images: list[dict],
                    annotations_dir: Path | None = None) -> None:
    """Split ``split`` of the dataset folder ``out`` in VQAv2's format: the question and annotation
    files, and the caption file listing ``images`` (``id``, ``file_name``) without captions; each
    file replaced whole, the other splits' kept. ``annotations_dir``: write there instead of
    ``out/annotations`` (a temporary folder that becomes it)."""
    paths = scenes_paths(out, split)
    folder = paths["captions"].parent if annotations_dir is None else Path(annotations_dir)
    write_json(folder / paths["vqa_questions"].name, {"questions": questions}, compact=True)
    write_json(folder / paths["vqa_annotations"].name, {"annotations": annotations}, compact=True)
    write_json(folder / paths["captions"].name, {"images": images, "annotations": []}, compact=True)


def vqa_split(questions: list[dict], annotations: list[dict], image_folder: str) -> tuple[list, list, list, int]:
    """Questions and annotations in VQAv2's format as one split: (questions by id, their annotations, the COCO
    images they ask about as ``{image_folder}/COCO_{image_folder}_{id:012d}.jpg``, how many annotations lacked
    ``multiple_choice_answer`` and got their most frequent answer). A question without annotation is refused."""
    questions = sorted(questions, key=lambda q: q["question_id"])
    by_id = {a["question_id"]: a for a in annotations}
    missing = [q["question_id"] for q in questions if q["question_id"] not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} questions have no annotation, e.g. question_id {missing[:5]}")
    out, filled = [], 0
    for q in questions:
        a = dict(by_id[q["question_id"]])
        if "multiple_choice_answer" not in a:
            a["multiple_choice_answer"] = majority_answer(a["answers"])
            filled += 1
        out.append(a)
    images = [{"id": i, "file_name": f"{image_folder}/COCO_{image_folder}_{i:012d}.jpg"}
              for i in sorted({q["image_id"] for q in questions})]
    return questions, out, images, filled


def prepare_vqa(vqa_questions: list[Path], vqa_annotations: list[Path], split: str, out: Path, image_folder: str
                ) -> dict:
    """Question and annotation files in VQAv2's format (OK-VQA, VQAv2's own val, ...) as split
    ``split`` of the dataset folder ``out``, taken whole, without Karpathy's division: the
    question and annotation JSON, and the caption file listing the split's COCO images (no
    captions) as ``{image_folder}/COCO_{image_folder}_{id:012d}.jpg``. The other splits' files in
    ``out`` are kept; each file is replaced whole. Returns the counts."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed {list(SPLITS)}")
    if not vqa_questions or len(vqa_questions) != len(vqa_annotations):
        raise ValueError(f"{len(vqa_questions)} question files and {len(vqa_annotations)} annotation files: "
                         "give one annotation file per question file, at least one")
    questions, annotations, images, filled = vqa_split(
        [q for path in vqa_questions for q in read_json(path)["questions"]],
        [a for path in vqa_annotations for a in read_json(path)["annotations"]], image_folder)
    write_vqa_split(out, split, questions, annotations, images)
    return {"split": split, "questions": len(questions), "images": len(images), "majority_answers_filled": filled}


# the splits a dataset folder taken whole from train and test files has; its val split is empty
WHOLE_SPLITS = ("train", "test")


def write_whole_folder(out: Path, splits: dict[str, tuple[list, list, list]], image_folders: list[Path],
                       media: str = "images", noun: str = "image") -> None:
    """A dataset folder from (questions, annotations, images) of its splits (one it lacks is empty): the image
    folders linked under ``out/{media}`` first (``audio``: an audio dataset's clips), then every image listed checked
    there (the error lists the missing), then ``out/annotations`` written whole (a temporary folder renamed: it
    appears complete or not)."""
    if image_folders and media == "images":
        link_images(list(image_folders), out / media)
    elif image_folders:
        link_folders(list(image_folders), out / media, f"the extracted archive's folder of {noun}s", flag=f"--{media}")
    check_images({split: {"images": splits[split][2] if split in splits else []} for split in SPLITS},
                 out / media, "the questions ask about", noun=noun)
    with atomic_dir(out / "annotations") as tmp:
        for split in SPLITS:
            questions, annotations, images = splits.get(split, ([], [], []))
            write_vqa_split(out, split, questions, annotations, images, annotations_dir=tmp)


def prepare_vqa_folder(train: tuple[Path, Path], test: tuple[Path, Path], out: Path,
                       image_folders: list[Path] = ()) -> dict:
    """A dataset folder of files in VQAv2's format taken whole (OK-VQA; the ``prepare_vqa`` stage): ``train``
    (questions file, annotations file) as split train, ``test`` as split test (OK-VQA's val, on which the paper's
    code evaluates), and an empty val (the files have no third split; paper scale reads train and test). Each
    split's images are COCO's, in the folder its questions file names as ``data_subtype`` (train2014, val2014),
    linked from ``image_folders`` (the extracted COCO zips) under ``out/images``. Returns the counts."""
    splits, counts = {}, {}
    for split, (questions_path, annotations_path) in zip(WHOLE_SPLITS, (train, test), strict=True):
        questions = read_json(questions_path)
        subtype = questions.get("data_subtype") if isinstance(questions, dict) else None
        if not isinstance(subtype, str) or not subtype:
            raise ValueError(f"{questions_path}: no data_subtype (train2014, val2014): a questions file in VQAv2's "
                             "format names the COCO image folder of its questions there")
        qs, anns, images, filled = vqa_split(questions["questions"], read_json(annotations_path)["annotations"],
                                             subtype)
        splits[split] = (qs, anns, images)
        counts[split] = {"questions": len(qs), "images": len(images), "image_folder": subtype,
                         "majority_answers_filled": filled}
    write_whole_folder(out, splits, list(image_folders))
    return counts
