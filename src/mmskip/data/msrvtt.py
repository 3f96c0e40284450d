"""MSR-VTT (Xu et al. 2016) captioning as a dataset folder in the COCO caption format.

Input: ``MSRVTT.zip`` as Frozen in Time publishes it (the ``msrvtt`` source of ``mmskip fetch_data``), extracted:
``MSRVTT/annotation/MSR_VTT.json`` (COCO-like: ``annotations`` of ``image_id`` = ``video{N}`` and ``caption``, 20
per video), ``MSRVTT/videos/all/video{N}.mp4``, and the split lists ``MSRVTT/high-quality/structured-symlinks/
{train,val,test}_list_full.txt`` (MSR-VTT's own captioning split, 6513 / 497 / 2990 videos) and
``{train,val}_list_jsfusion.txt`` (JSFusion's 9000 training videos and its 1000 test videos, "1k-A").

Written (:func:`prepare_msrvtt_folder`): ``annotations/captions_{split}.json``, each video an entry of ``images``
(``id`` = N + 1 for ``video{N}``, ``file_name`` = ``all/video{N}.mp4`` under the folder's ``videos/``, and
``msrvtt_video_id``) with all its captions, and ``videos/all`` linked to the extracted folder. ``--split full``
(the default) keeps MSR-VTT's split; ``jsfusion`` trains on its 9000 videos and tests on 1k-A, with no val. The
paper's code trains on a 7k list and tests on 1k-A from its own preprocessed files, which the zip does not hold.

MSRVTT-QA (Xu et al. 2017) asks questions about the same videos: :func:`prepare_msrvtt_qa_folder` reads its three
files from your folder (params ``sources.msrvtt_qa``: its publishers give no stable download) and writes them in
VQAv2's format on the zip's videos.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmskip.data.coco import SPLITS, check_images, link_folders, write_whole_folder
from mmskip.data.formats import VIDEOS, scenes_paths
from mmskip.io import atomic_dir, read_json, write_json

SPLIT_LISTS = {  # the pipeline's splits -> the list file each reads under high-quality/structured-symlinks
    "full": {"train": "train_list_full.txt", "val": "val_list_full.txt", "test": "test_list_full.txt"},
    "jsfusion": {"train": "train_list_jsfusion.txt", "val": None, "test": "val_list_jsfusion.txt"},
}
VIDEO_ID = re.compile(r"^video(\d+)$")


def _number(video: str, where: str) -> int:
    match = VIDEO_ID.match(video)
    if not match:
        raise ValueError(f"{where}: video id {video!r}; MSR-VTT's are video0 ... video9999")
    return int(match.group(1))


def read_msrvtt_captions(path: Path) -> dict[str, list[str]]:
    """video id -> its captions in file order, from MSR_VTT.json; a caption without its video id or text is
    refused, naming the file and the annotation."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: expected a JSON object with a list 'annotations' (MSR_VTT.json)")
    captions: dict[str, list[str]] = {}
    for n, ann in enumerate(data["annotations"]):
        ann_fields = ann if isinstance(ann, dict) else {}
        video, caption = ann_fields.get("image_id"), str(ann_fields.get("caption") or "").strip()
        if not isinstance(video, str) or not caption:
            raise ValueError(f"{path}: annotation {n} ({ann!r}) lacks its video id (image_id) or its caption")
        _number(video, f"{path}, annotation {n}")
        captions.setdefault(video, []).append(caption)
    return captions


def read_split_list(path: Path) -> list[str]:
    """The video ids of a split list, one a line; a repeated or malformed id is refused, naming the line."""
    videos, seen = [], set()
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        video = text.strip()
        if not video:
            continue
        _number(video, f"{path}, line {line}")
        if video in seen:
            raise ValueError(f"{path}, line {line}: {video} repeated")
        seen.add(video)
        videos.append(video)
    return videos


def prepare_msrvtt_folder(root: Path, out: Path, split: str = "full") -> dict:
    """The dataset folder ``out`` from the extracted ``MSRVTT`` folder ``root``, with the split ``split`` (``full``
    or ``jsfusion``). Every video a split lists must have captions and its file under ``videos/all``: the error
    lists the missing, and nothing is written. Returns the videos and captions per split."""
    if split not in SPLIT_LISTS:
        raise ValueError(f"--split {split!r}: allowed {', '.join(SPLIT_LISTS)}")
    lists = root / "high-quality" / "structured-symlinks"
    captions = read_msrvtt_captions(root / "annotation" / "MSR_VTT.json")
    splits: dict[str, dict] = {}
    taken: dict[str, str] = {}
    next_caption = 1
    for name in SPLITS:
        listed = read_split_list(lists / SPLIT_LISTS[split][name]) if SPLIT_LISTS[split][name] else []
        uncaptioned = [v for v in listed if v not in captions]
        if uncaptioned:
            raise ValueError(f"{lists / SPLIT_LISTS[split][name]}: {len(uncaptioned)} video(s) without captions in "
                             f"MSR_VTT.json, e.g. {uncaptioned[:5]}")
        twice = [v for v in listed if v in taken]
        if twice:
            raise ValueError(f"--split {split}: {twice[:5]} in both {taken[twice[0]]} and {name}")
        taken.update({v: name for v in listed})
        images, annotations = [], []
        for video in sorted(listed, key=lambda v: _number(v, "")):
            number = _number(video, "") + 1
            images.append({"id": number, "file_name": f"all/{video}.mp4", "msrvtt_video_id": video})
            for caption in captions[video]:
                annotations.append({"id": next_caption, "image_id": number, "caption": caption})
                next_caption += 1
        splits[name] = {"images": images, "annotations": annotations}
    media = out / VIDEOS
    link_folders([root / "videos" / "all"], media, "the extracted MSRVTT.zip's MSRVTT/videos/all/", flag="--root")
    check_images(splits, media, "the split lists name", noun="video")
    with atomic_dir(out / "annotations") as tmp:  # the folder appears whole or not at all
        for name in SPLITS:
            write_json(tmp / scenes_paths(out, name)["captions"].name, splits[name], compact=True)
    return {name: {"videos": len(splits[name]["images"]), "captions": len(splits[name]["annotations"])}
            for name in SPLITS}


# ----------------------------------------------------------------------------- MSRVTT-QA

QA_FILES = {"train": "train_qa.json", "val": "val_qa.json", "test": "test_qa.json"}
QA_FIELDS = ("question", "answer", "video_id")
ANSWERS = 10  # VQAv2's annotators per question: the one answer is given ten times (exact match)


def read_msrvtt_qa(path: Path) -> list[dict]:
    """The questions of an MSRVTT-QA file (a JSON list of ``{"question", "answer", "video_id", "id", ...}``,
    ``video_id`` N or ``"videoN"``), in file order, each with its video as ``videoN``; a question without those
    fields is refused, naming the file and its place."""
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: an MSRVTT-QA file is a JSON list of questions, not a {type(data).__name__}")
    out = []
    for n, entry in enumerate(data):
        fields = entry if isinstance(entry, dict) else {}
        missing = [f for f in QA_FIELDS if fields.get(f) in (None, "")]
        if missing:
            raise ValueError(f"{path}, question {n} ({entry!r}): lacks {missing}; an MSRVTT-QA question has "
                             f"{list(QA_FIELDS)}")
        video = fields["video_id"]
        video = f"video{video}" if isinstance(video, int) else str(video)
        _number(video, f"{path}, question {n}")
        out.append({**fields, "video": video})
    return out


def prepare_msrvtt_qa_folder(root: Path, qa: Path, out: Path) -> dict:
    """The dataset folder ``out`` of MSRVTT-QA (Xu et al. 2017): its ``train_qa.json``, ``val_qa.json`` and
    ``test_qa.json`` in the folder ``qa`` (your copy: no stage downloads them), on the videos of the extracted
    ``MSRVTT`` folder ``root`` (Frozen in Time's MSRVTT.zip, ``videos/all``), in VQAv2's format as GQA's
    (:mod:`mmskip.data.gqa`): the answer given ten times (exact match, MSRVTT-QA's accuracy), ``question_type`` the
    question's first word (what, who, how, when, where: MSRVTT-QA's breakdown), videos numbered as MSR-VTT
    captioning's (N + 1 for ``videoN``) and questions across the splits in file order. Every video asked about must be
    under ``videos/all``: the error lists the missing, and nothing is written. Returns the videos and questions per
    split."""
    missing = [name for name in QA_FILES.values() if not (qa / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{qa}: no {', '.join(missing)} (MSRVTT-QA's files, in sources.msrvtt_qa's folder)")
    splits, next_question = {}, 1
    for split in SPLITS:
        questions, annotations, videos = [], [], {}
        for entry in read_msrvtt_qa(qa / QA_FILES[split]):
            number = _number(entry["video"], "") + 1
            videos[number] = entry["video"]
            kind = str(entry["question"]).split()[0].lower()
            answer = str(entry["answer"]).strip()
            questions.append({"question_id": next_question, "image_id": number, "question": str(entry["question"])})
            annotations.append({"question_id": next_question, "image_id": number, "question_type": kind,
                                "answer_type": "other", "multiple_choice_answer": answer,
                                "answers": [{"answer_id": i + 1, "answer": answer} for i in range(ANSWERS)],
                                **({"msrvtt_qa_id": entry["id"]} if "id" in entry else {})})
            next_question += 1
        images = [{"id": number, "file_name": f"all/{video}.mp4", "msrvtt_video_id": video}
                  for number, video in sorted(videos.items())]
        splits[split] = (questions, annotations, images)
    write_whole_folder(out, splits, [root / "videos" / "all"], media=VIDEOS, noun="video")
    return {split: {"videos": len(splits[split][2]), "questions": len(splits[split][0])} for split in SPLITS}
