"""Datasets the Hugging Face Hub distributes as Parquet, read offline from a pinned snapshot.

Fetching is a step of its own, where the hub is reachable (a login node):
``mmskip fetch_hub_dataset --id lmms-lab/VQAv2 --revision COMMIT --cache CACHE --files
'data/validation-*'`` downloads the matching files of that commit (``huggingface_hub`` checks
them) into the hub's cache layout and prints the commit to pin. Jobs then find the snapshot with
:func:`resolve_dataset` (:func:`mmskip.foundation.hub.resolve`), which never touches the
network, and read its Parquet files with ``datasets`` (streamed: one row group in memory at a
time, whatever the split's size).

:func:`prepare_hub_vqa` turns a VQAv2 split of such a snapshot (``lmms-lab/VQAv2``: one row per
question with ``question_id``, ``question``, ``question_type``, ``answers``,
``multiple_choice_answer``, ``image_id`` and the image itself) into the dataset folder the pipeline
reads (:func:`mmskip.data.formats.scenes_paths`): VQAv2 question and annotation JSON, the COCO
caption JSON listing the split's images (without captions), and each image written once under
``images/``. The column names are checked first; a missing one is named with the columns found.
"""

from __future__ import annotations

import io
from pathlib import Path

from mmskip.data.formats import scenes_paths
from mmskip.foundation.hub import MissingDatasetError, resolve  # noqa: F401  (MissingDatasetError: re-exported)
from mmskip.io import atomic_dir, write_json

VQA_COLUMNS = ("question_id", "question", "question_type", "answers", "multiple_choice_answer", "image_id", "image")


def resolve_dataset(repo_id: str, revision: str, cache_dir, files: tuple[str, ...] = ()) -> Path:
    """The local snapshot of dataset ``repo_id`` at ``revision`` in ``cache_dir``, without any network
    (:func:`mmskip.foundation.hub.resolve`); :class:`MissingDatasetError` naming the command that
    fetches its ``files`` when absent."""
    return resolve(repo_id, revision, cache_dir, repo_type="dataset", files=files)


def split_files(snapshot: Path, split: str) -> list[Path]:
    """The Parquet files of ``split`` in a snapshot (``data/{split}-*.parquet``, the hub's layout)."""
    files = sorted((snapshot / "data").glob(f"{split}-*.parquet"))
    if not files:
        found = sorted({p.name.split("-")[0] for p in (snapshot / "data").glob("*.parquet")})
        raise FileNotFoundError(f"{snapshot}: no Parquet files of split {split!r} (data/{split}-*.parquet); "
                                f"splits present: {found}")
    return files


def _image_bytes(value) -> tuple[bytes, str]:
    """The encoded image and its file suffix, from a ``datasets`` Image value left undecoded."""
    data = value.get("bytes") if isinstance(value, dict) else None
    if not data:
        raise ValueError(f"an image value without bytes ({type(value).__name__}); expected the Parquet's encoded image")
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        fmt = (image.format or "").lower()
    return data, {"jpeg": ".jpg", "png": ".png"}.get(fmt, f".{fmt or 'img'}")


def _answers(value, question_id) -> list[dict]:
    """VQAv2's ten answers as annotation dicts (a list of dicts or of strings)."""
    out = []
    for i, a in enumerate(value):
        if isinstance(a, dict):
            out.append({"answer": a["answer"], "answer_confidence": a.get("answer_confidence", "yes"),
                        "answer_id": a.get("answer_id", i + 1)})
        elif isinstance(a, str):
            out.append({"answer": a, "answer_confidence": "yes", "answer_id": i + 1})
        else:
            raise ValueError(f"question {question_id}: answers hold {type(a).__name__}; expected dicts or strings")
    if not out:
        raise ValueError(f"question {question_id}: no answers")
    return out


def prepare_hub_vqa(snapshot: Path, split: str, out: Path, as_split: str = "test", limit: int = 0,
                    image_folder: str | None = None) -> dict:
    """The first ``limit`` questions (0: all) of ``split`` in ``snapshot``, in file order, as the
    dataset folder ``out`` with the pipeline split ``as_split``. Returns the counts."""
    import datasets

    if limit < 0:
        raise ValueError(f"limit={limit}: allowed 0 (all) or a number of questions")
    files = split_files(Path(snapshot), split)
    stream = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True)
    if stream.features is not None:  # the Parquet schema, read before any row
        missing = [c for c in VQA_COLUMNS if c not in stream.features]
        if missing:
            raise ValueError(f"{files[0]}: columns {missing} missing; found {list(stream.features)}")
    stream = stream.cast_column("image", datasets.Image(decode=False))
    folder = image_folder or split
    questions, annotations, images = [], [], {}
    with atomic_dir(out) as tmp:
        paths = scenes_paths(tmp, as_split)
        (paths["images"] / folder).mkdir(parents=True)
        for row in stream:
            if limit and len(questions) == limit:
                break
            qid, image_id = int(row["question_id"]), int(row["image_id"])
            questions.append({"question_id": qid, "image_id": image_id, "question": row["question"]})
            annotations.append({"question_id": qid, "image_id": image_id, "question_type": row["question_type"],
                                "answer_type": row.get("answer_type") or "", "answers": _answers(row["answers"], qid),
                                "multiple_choice_answer": row["multiple_choice_answer"]})
            if image_id not in images:
                data, suffix = _image_bytes(row["image"])
                name = f"{folder}/{image_id:012d}{suffix}"
                (paths["images"] / name).write_bytes(data)
                images[image_id] = name
        if not questions:
            raise ValueError(f"{snapshot}: split {split!r} has no rows")
        paths["captions"].parent.mkdir(parents=True, exist_ok=True)
        write_json(paths["vqa_questions"], {"questions": questions})
        write_json(paths["vqa_annotations"], {"annotations": annotations})
        write_json(paths["captions"], {"images": [{"id": i, "file_name": images[i]} for i in sorted(images)],
                                       "annotations": []})
    return {"split": as_split, "questions": len(questions), "images": len(images)}
