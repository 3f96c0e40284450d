"""Readers for the datasets' on-disk formats: COCO captions and VQAv2.

The procedural scenes are written in these formats, so the same readers serve real COCO
(Karpathy splits converted to COCO caption JSON) and VQAv2 at paper scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmskip.io import read_json


@dataclass(frozen=True)
class VQAExample:
    question_id: int
    image_id: int
    question: str
    question_type: str
    answers: tuple[str, ...]  # the ten annotator answers
    multiple_choice_answer: str


@dataclass(frozen=True)
class CaptionExample:
    image_id: int
    file_name: str
    captions: tuple[str, ...]


def read_vqa(questions_path: str | Path, annotations_path: str | Path) -> list[VQAExample]:
    """Join a VQAv2 questions file with its annotations file, ordered by question id."""
    questions = read_json(questions_path)["questions"]
    annotations = {a["question_id"]: a for a in read_json(annotations_path)["annotations"]}
    examples = []
    for q in questions:
        try:
            a = annotations[q["question_id"]]
        except KeyError:
            raise ValueError(f"question_id {q['question_id']} of {questions_path} has no annotation "
                             f"in {annotations_path}") from None
        examples.append(VQAExample(
            question_id=q["question_id"], image_id=q["image_id"], question=q["question"],
            question_type=a["question_type"], answers=tuple(x["answer"] for x in a["answers"]),
            multiple_choice_answer=a["multiple_choice_answer"]))
    return sorted(examples, key=lambda e: e.question_id)


def read_captions(path: str | Path) -> list[CaptionExample]:
    """Group a COCO caption file's annotations by image, ordered by image id."""
    data = read_json(path)
    by_image: dict[int, list[str]] = {img["id"]: [] for img in data["images"]}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        if ann["image_id"] not in by_image:
            raise ValueError(f"caption {ann['id']} of {path} names unknown image_id {ann['image_id']}")
        by_image[ann["image_id"]].append(ann["caption"])
    files = {img["id"]: img["file_name"] for img in data["images"]}
    return [CaptionExample(i, files[i], tuple(by_image[i])) for i in sorted(by_image)]


AUDIO = "audio"  # an audio dataset's media folder (its clips), where an image dataset has images/
VIDEOS = "videos"  # a video dataset's media folder


def scenes_paths(scenes_dir: str | Path, split: str) -> dict[str, Path]:
    """File names of one split inside a scenes/dataset folder."""
    root = Path(scenes_dir)
    return {
        "images": root / "images",
        "captions": root / "annotations" / f"captions_{split}.json",
        "vqa_questions": root / "annotations" / f"vqa_questions_{split}.json",
        "vqa_annotations": root / "annotations" / f"vqa_annotations_{split}.json",
        "scenes": root / f"scenes_{split}.json",
    }


def split_images(dataset: Path, split: str, media: str = "images") -> list[tuple[int, Path]]:
    """(image id, file) of every image of a split: the records' order for the embedded default
    (``scenes_{split}.json``; a record's ``file_name`` where it has one, as the sounds' clips), else the images
    of the split's COCO caption file (paper scale, :mod:`mmskip.data.coco`), by id, their files under the
    dataset's ``media`` folder (``audio``: the clips of an audio dataset, which its caption file lists as its
    images)."""
    paths = scenes_paths(dataset, split)
    paths["images"] = Path(dataset) / media
    if paths["scenes"].exists():
        return [(r["image_id"], paths["images"] / r.get("file_name", f"{split}/{r['image_id']:06d}.png"))
                for r in read_json(paths["scenes"])["scenes"]]
    if paths["captions"].exists():
        images = read_json(paths["captions"])["images"]
        return [(i["id"], paths["images"] / i["file_name"]) for i in sorted(images, key=lambda i: i["id"])]
    raise FileNotFoundError(f"{dataset}: neither {paths['scenes'].name} nor annotations/{paths['captions'].name} "
                            f"lists the images of split {split!r}")
