"""The task registry: everything the pipeline knows about a task lives in its entry.

A task is an entry, not a set of branches: its name, modality, how its examples are read
(evaluation) and turned into (prompt, target) training pairs, how predictions are scored, its
headline metric, and which params keys hold its token limit, example limits and training steps.
Runners look a task up by name (``get_task``) and never compare task names; adding a task of an
existing format is one ``register`` call and one entry in params.yaml's ``tasks`` list.

Two formats exist today:

- ``vqa``: short answers, VQAv2 files, scored with the official VQA accuracy; its tasks share
  the ``vqa_*`` params keys (``evaluation.vqa_max_new_tokens``, ``mapper.vqa_steps``,
  ``prompts.vqa_prompt``, ...);
- ``caption``: COCO caption files, scored with pycocoevalcap (BLEU/METEOR/ROUGE-L/CIDEr); its
  tasks share the ``caption_*`` keys.

A task of a format may restrict its examples (``question_types``), e.g. existence questions
only: ``register(Task("exist", "image", VQA, question_types=("exist",)))``.

A task reads the run's dataset (the scenes, or COCO at paper scale) unless it names a ``dataset`` of its
own, a folder with its own feature cache that paper scale downloads and prepares (``mmskip.stages``):
OK-VQA (``okvqa``, questions on COCO 2014's images) and GQA (``gqa``, its own images). Both are VQA
tasks on the ``vqa_*`` keys, as in the paper's code (the same prompt and answer length as VQAv2).

A task's modality chooses the encoder its dataset's feature cache is made with (params ``sources``: ``encoder``
for images, ``video_encoder`` for video, ``audio_encoder`` for audio, ``mmskip.params.ENCODERS``). MSR-VTT
captioning (``msrvtt``) is the video task, its clips' frames encoded by a TimeSformer. Clotho captioning
(``clotho``) is the first audio task: a captioning task on the ``caption_*`` keys, its clips encoded by an Audio
Spectrogram Transformer;
AudioCaps captioning (``audiocaps``) is the second, on the clips of the user's folder (params
``sources.audiocaps_audio``: AudioCaps is on YouTube only). The QA tasks of those modalities are MSRVTT-QA
(``msrvtt_qa``, its question files from the user's folder, ``sources.msrvtt_qa``, on MSR-VTT's videos) and
Clotho-AQA (``clotho_aqa``), VQA tasks on the ``vqa_*`` keys scored by exact match with their answer, as GQA.

The embedded default's video tasks, ``video_qa`` and ``video_caption``, and its audio tasks, ``audio_qa`` and
``audio_caption``, read datasets it generates beside the scenes (``GENERATED_DATASETS``: the clips,
:mod:`mmskip.data.clips`, and the sounds, :mod:`mmskip.data.sounds`), encoded by a VideoMAE encoder and an Audio
Spectrogram Transformer the pipeline pretrains on them; the LLM is pretrained on every dataset's texts
(``tasks_of_dataset``).

(Registry after lmms-eval's ``tasks/`` and transformers' ``Auto*`` mappings; no torch here.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmskip.data.formats import CaptionExample, VQAExample, read_captions, read_vqa, scenes_paths


@dataclass(frozen=True)
class Format:
    """How examples of a kind look, are prompted and scored, and which params keys they read."""

    name: str
    id_field: str  # the example id predictions.json lists: question_id or image_id
    headline: str  # the metric the report and the summary lead with
    prompt_key: str  # prompts.<key>
    max_new_tokens_key: str  # evaluation.<key>
    steps_key: str  # mapper.<key> (and train_compressed.finetune_<key>, train_compressed.small_<key>)
    limit_key: str  # skipping.<key>, compression.<key>: the first N examples evaluated
    breakdown: str | None = None  # metrics.json's per-group scores (VQA: per_question_type)

    def read(self, scenes: Path, split: str) -> list:
        paths = scenes_paths(scenes, split)
        if self is VQA:
            return read_vqa(paths["vqa_questions"], paths["vqa_annotations"])
        return read_captions(paths["captions"])


VQA = Format("vqa", id_field="question_id", headline="accuracy", prompt_key="vqa_prompt",
             max_new_tokens_key="vqa_max_new_tokens", steps_key="vqa_steps", limit_key="vqa_questions",
             breakdown="per_question_type")
CAPTION = Format("caption", id_field="image_id", headline="CIDEr", prompt_key="caption_prompt",
                 max_new_tokens_key="caption_max_new_tokens", steps_key="caption_steps", limit_key="caption_images")


def scaled(value: int, share: float) -> int:
    """``value`` x ``share`` rounded (half to even), at least 1; 0 (a fallback: the mapper's own steps) stays 0."""
    return max(1, round(value * share)) if value else 0


@dataclass(frozen=True)
class Task:
    """One registered task: a format, a modality and, optionally, a subset of its examples."""

    name: str
    modality: str  # image, video or audio: which encoder's features it reads
    format: Format
    question_types: tuple[str, ...] = ()  # VQA: keep only these question types (empty: all)
    dataset: str = ""  # a dataset folder of its own (data/<dataset>, paper scale); "": the run's dataset
    user_media: str = ""  # the params sources key of the user's folder of the files no stage downloads (its media,
    # or its questions)

    # --- examples ---------------------------------------------------------------------------
    def examples(self, scenes: Path, split: str) -> list:
        """The split's examples in file order (VQA: by question id; captions: by image id)."""
        items = self.format.read(scenes, split)
        if self.question_types:
            items = [e for e in items if e.question_type in self.question_types]
        if not items:
            raise ValueError(f"task {self.name!r}: no examples in split {split!r} of {scenes}")
        return items

    def example_id(self, example) -> int:
        return getattr(example, self.format.id_field)

    def prompt(self, prompts, example) -> str:
        """The text prompt after the soft visual prompt (params ``prompts``)."""
        template = getattr(prompts, self.format.prompt_key)
        return template.format(question=example.question) if self.format is VQA else template

    def training_pairs(self, scenes: Path, split: str, prompts) -> list[tuple[int, str, str]]:
        """(image_id, prompt, target) triples; a captioned image gives one per reference."""
        out = []
        for e in self.examples(scenes, split):
            targets = (e.multiple_choice_answer,) if self.format is VQA else e.captions
            out += [(e.image_id, self.prompt(prompts, e), t) for t in targets]
        return out

    # --- params keys ------------------------------------------------------------------------
    def max_new_tokens(self, evaluation) -> int:
        return getattr(evaluation, self.format.max_new_tokens_key)

    def limit(self, cfg, shares=None) -> int:
        """How many examples a section (``skipping``, ``compression``) evaluates (0: all): the format's key, or
        the modality's share of it (params ``example_shares``), at least 1."""
        n = getattr(cfg, self.format.limit_key)
        return n if shares is None else scaled(n, self.share(shares))

    def share(self, shares) -> float:
        """The modality's share (params ``step_shares``, ``example_shares``)."""
        return shares[self.modality] if isinstance(shares, Mapping) else getattr(shares, self.modality)

    def steps(self, cfg, shares, prefix: str = "") -> int:
        """Training steps from ``mapper.<key>`` or, with a prefix, ``train_compressed.<prefix><key>``: the
        modality's share of it (params ``step_shares``), at least 1; 0 (``small_*``: the mapper's own) stays 0."""
        key = prefix + self.format.steps_key
        return scaled(cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key), self.share(shares))

    # --- predictions --------------------------------------------------------------------------
    def items(self, examples: Sequence, predictions: Sequence[str]) -> list[dict[str, Any]]:
        """One record per example for predictions.json: its id, inputs, prediction and references
        (what the format's scorer reads, ``mmskip.evaluation.scoring``)."""
        if self.format is VQA:
            return [{"question_id": e.question_id, "image_id": e.image_id, "question": e.question,
                     "question_type": e.question_type, "prediction": p, "answers": list(e.answers)}
                    for e, p in zip(examples, predictions, strict=True)]
        return [{"image_id": e.image_id, "prediction": p, "references": list(e.captions)}
                for e, p in zip(examples, predictions, strict=True)]

TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in TASKS and TASKS[task.name] != task:
        raise ValueError(f"task {task.name!r} is registered already, as {TASKS[task.name]}")
    TASKS[task.name] = task
    return task


register(Task("vqa", "image", VQA))
register(Task("caption", "image", CAPTION))
register(Task("okvqa", "image", VQA, dataset="okvqa"))  # OK-VQA: train -> train, val -> test (the paper's code)
register(Task("gqa", "image", VQA, dataset="gqa"))  # GQA balanced: train -> train, val ("valid") -> test
register(Task("msrvtt", "video", CAPTION, dataset="msrvtt"))  # MSR-VTT: its own split, or JSFusion's
# MSRVTT-QA: its train, val, test files from the user's folder (no stable download), on MSR-VTT's videos
register(Task("msrvtt_qa", "video", VQA, dataset="msrvtt_qa", user_media="msrvtt_qa"))
register(Task("clotho", "audio", CAPTION, dataset="clotho"))  # Clotho v2.1: development, validation, evaluation
register(Task("clotho_aqa", "audio", VQA, dataset="clotho_aqa"))  # Clotho-AQA: train, val, test
# AudioCaps: train, val, test, on the clips of the user's folder (YouTube only)
register(Task("audiocaps", "audio", CAPTION, dataset="audiocaps", user_media="audiocaps_audio"))
# The embedded default's video tasks, on the generated clips (mmskip.data.clips): questions that need time (what
# moves where, what appears first or last) and captions of the objects in order of appearance; its audio tasks, on
# the generated sounds (mmskip.data.sounds): questions that need listening and captions of the notes in order
register(Task("video_qa", "video", VQA, dataset="clips"))
register(Task("video_caption", "video", CAPTION, dataset="clips"))
register(Task("audio_qa", "audio", VQA, dataset="sounds"))
register(Task("audio_caption", "audio", CAPTION, dataset="sounds"))

# The datasets a task can name that the embedded default generates (a stage each, mmskip.stages), where paper
# scale's are downloaded
GENERATED_DATASETS = ("clips", "sounds")


def tasks_of_dataset(dataset: str) -> tuple[Task, Task]:
    """The VQA and the captioning task of a dataset (``""``: the run's own, the scenes), whose text the embedded
    LLM is pretrained on."""
    of = [task for task in TASKS.values() if task.dataset == dataset and not task.question_types]
    return (next(t for t in of if t.format is VQA), next(t for t in of if t.format is CAPTION))


def default_tasks() -> tuple[str, ...]:
    """The registered tasks that read the run's own dataset (no ``dataset`` of their own): the tasks of a
    run whose params name none (params.yaml's default lists the same, vqa and caption)."""
    return tuple(name for name, task in TASKS.items() if not task.dataset)


def tasks_of(params: Mapping[str, Any]) -> tuple[str, ...]:
    """params' ``tasks`` (``default_tasks()`` where params have no such key)."""
    return tuple(params.get("tasks") or default_tasks())


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task={name!r}: allowed {sorted(TASKS)} (mmskip.tasks registry)") from None


def headline(name: str) -> str:
    """The metric a task's results are compared by (VQA accuracy, CIDEr)."""
    return get_task(name).format.headline


__all__ = ["CAPTION", "GENERATED_DATASETS", "VQA", "CaptionExample", "Format", "TASKS", "Task", "VQAExample",
           "default_tasks", "get_task", "headline", "register", "tasks_of", "tasks_of_dataset"]
