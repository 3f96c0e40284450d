"""The text the tiny LLM is pretrained on: scene description, then a question or a caption.

A generated dataset of another modality (the clips, :mod:`mmskip.data.clips`; the sounds, :mod:`mmskip.data.sounds`)
is written the same way, a description per clip: its text joins the scenes' (``dataset`` names it, as its tasks'
registry entries do), so one LLM reads every modality's descriptions, as one frozen LLM serves every modality in the
paper.

``prompts`` are the same templates the mapper is later trained and evaluated with, so the
soft prompt can take the description's place in front of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from mmskip.data.formats import scenes_paths
from mmskip.io import read_json
from mmskip.params import PromptsConfig
from mmskip.tasks import GENERATED_DATASETS, tasks_of_dataset


@dataclass(frozen=True)
class Segment:
    """One training text: ``context`` (description) + `` prompt`` + `` target``."""

    context: str
    prompt: str
    target: str
    task: str
    # the clip a video's or a sound's segment belongs to: its document is its own clip's (None: the scenes, grouped
    # by description, which almost never repeats; the clips' and the sounds' do, a one-note sound having 144
    # possible descriptions, a one-object video 90)
    record: int | None = None


@dataclass(frozen=True)
class Document:
    """A scene description followed by several (prompt, target) pairs: one pretraining text."""

    context: str
    pairs: tuple[tuple[str, str], ...]


def documents(segments: Iterator[Segment] | list[Segment]) -> list[Document]:
    """Group segments by description and record (first-seen order): one document per scene, or per clip."""
    pairs: dict[tuple[str, int | None], list[tuple[str, str]]] = {}
    for seg in segments:
        pairs.setdefault((seg.context, seg.record), []).append((seg.prompt, seg.target))
    return [Document(context, tuple(p)) for (context, _), p in pairs.items()]


def split_segments(scenes_dir: Path, split: str, prompts: PromptsConfig, dataset: str = "") -> list[Segment]:
    """Description + question/caption segments of one split of a generated dataset (its VQA and captioning
    tasks; ``""``: the scenes)."""
    paths = scenes_paths(scenes_dir, split)
    descriptions = {s["image_id"]: s["description"] for s in read_json(paths["scenes"])["scenes"]}
    return [Segment(descriptions[image_id], prompt, target, task.name, image_id if dataset else None)
            for task in tasks_of_dataset(dataset)
            for image_id, prompt, target in task.training_pairs(scenes_dir, split, prompts)]


def text_scene_segments(scenes_dir: Path, prompts: PromptsConfig, dataset: str = "") -> Iterator[Segment]:
    """Segments of a generated dataset's text-only records (no images, no clips)."""
    vqa, caption = tasks_of_dataset(dataset)
    for s in read_json(Path(scenes_dir) / "text_scenes.json")["scenes"]:
        record = s["image_id"] if dataset else None
        for q in s["questions"]:
            yield Segment(s["description"], prompts.vqa_prompt.format(question=q["question"]), q["answer"], vqa.name,
                          record)
        for c in s["captions"]:
            yield Segment(s["description"], prompts.caption_prompt, c, caption.name, record)


def corpus(scenes_dir: Path, prompts: PromptsConfig, split: str = "train",
           generated: Mapping[str, Path] | None = None) -> list[Segment]:
    """The pretraining segments of a split: the scenes' (and, on train, their text-only scenes'), then those of each
    ``generated`` dataset (name -> folder: the clips, the sounds), the same, in ``GENERATED_DATASETS``' order."""
    generated = dict(generated or {})
    unknown = sorted(set(generated) - set(GENERATED_DATASETS))
    if unknown:
        raise ValueError(f"generated datasets {unknown}: allowed {list(GENERATED_DATASETS)}")
    out: list[Segment] = []
    for folder, dataset in ((scenes_dir, ""), *((generated[d], d) for d in GENERATED_DATASETS if d in generated)):
        out += split_segments(folder, split, prompts, dataset)
        out += list(text_scene_segments(folder, prompts, dataset)) if split == "train" else []
    return out
