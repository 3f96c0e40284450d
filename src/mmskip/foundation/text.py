"""The text the tiny LLM is pretrained on: scene description, then a question or a caption.

``prompts`` are the same templates the mapper is later trained and evaluated with, so the
soft prompt can take the description's place in front of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mmskip.data.formats import scenes_paths
from mmskip.io import read_json
from mmskip.params import PromptsConfig
from mmskip.tasks import get_task


@dataclass(frozen=True)
class Segment:
    """One training text: ``context`` (description) + `` prompt`` + `` target``."""

    context: str
    prompt: str
    target: str
    task: str


@dataclass(frozen=True)
class Document:
    """A scene description followed by several (prompt, target) pairs: one pretraining text."""

    context: str
    pairs: tuple[tuple[str, str], ...]


def documents(segments: Iterator[Segment] | list[Segment]) -> list[Document]:
    """Group segments by description (first-seen order): one document per scene."""
    pairs: dict[str, list[tuple[str, str]]] = {}
    for seg in segments:
        pairs.setdefault(seg.context, []).append((seg.prompt, seg.target))
    return [Document(context, tuple(p)) for context, p in pairs.items()]


def split_segments(scenes_dir: Path, split: str, prompts: PromptsConfig) -> list[Segment]:
    """Description + question/caption segments of one image split (the scene dataset's tasks)."""
    paths = scenes_paths(scenes_dir, split)
    descriptions = {s["image_id"]: s["description"] for s in read_json(paths["scenes"])["scenes"]}
    return [Segment(descriptions[image_id], prompt, target, task.name)
            for task in scene_tasks() for image_id, prompt, target in task.training_pairs(scenes_dir, split, prompts)]


def text_scene_segments(scenes_dir: Path, prompts: PromptsConfig) -> Iterator[Segment]:
    """Segments of the text-only scenes (no images)."""
    vqa, caption = scene_tasks()
    for s in read_json(Path(scenes_dir) / "text_scenes.json")["scenes"]:
        for q in s["questions"]:
            yield Segment(s["description"], prompts.vqa_prompt.format(question=q["question"]), q["answer"], vqa.name)
        for c in s["captions"]:
            yield Segment(s["description"], prompts.caption_prompt, c, caption.name)


def scene_tasks() -> tuple:
    """The scene dataset's two tasks, whose text the LLM is pretrained on: questions, then captions."""
    return get_task("vqa"), get_task("caption")
