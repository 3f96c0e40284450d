"""The text the tiny LLM is pretrained on: scene description, then a question or a caption.

``prompts`` are the same templates the mapper is later trained and evaluated with, so the
soft prompt can take the description's place in front of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mmskip.data.formats import read_captions, read_vqa, scenes_paths
from mmskip.io import read_json


@dataclass
class PromptsConfig:
    """Prompt templates shared by LLM pretraining, mapper training and evaluation."""

    vqa_prompt: str = "Question: {question} Answer:"  # must contain {question}
    caption_prompt: str = "Caption:"

    def __post_init__(self) -> None:
        if "{question}" not in self.vqa_prompt:
            raise ValueError(f"vqa_prompt={self.vqa_prompt!r}: must contain the placeholder {{question}}")

    def prompt(self, task: str, question: str | None = None) -> str:
        if task == "vqa":
            return self.vqa_prompt.format(question=question)
        if task == "caption":
            return self.caption_prompt
        raise ValueError(f"task={task!r}: allowed 'vqa', 'caption'")


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
    """Description + question/caption segments of one image split."""
    paths = scenes_paths(scenes_dir, split)
    descriptions = {s["image_id"]: s["description"] for s in read_json(paths["scenes"])["scenes"]}
    segments = [Segment(descriptions[e.image_id], prompts.prompt("vqa", e.question),
                        e.multiple_choice_answer, "vqa")
                for e in read_vqa(paths["vqa_questions"], paths["vqa_annotations"])]
    for e in read_captions(paths["captions"]):
        segments += [Segment(descriptions[e.image_id], prompts.caption_prompt, c, "caption")
                     for c in e.captions]
    return segments


def text_scene_segments(scenes_dir: Path, prompts: PromptsConfig) -> Iterator[Segment]:
    """Segments of the text-only scenes (no images)."""
    for s in read_json(Path(scenes_dir) / "text_scenes.json")["scenes"]:
        for q in s["questions"]:
            yield Segment(s["description"], prompts.prompt("vqa", q["question"]), q["answer"], "vqa")
        for c in s["captions"]:
            yield Segment(s["description"], prompts.caption_prompt, c, "caption")
