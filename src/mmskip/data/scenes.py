"""Procedural scene dataset (Sort-of-CLEVR style) in the real datasets' formats.

Each image holds 2-5 non-overlapping objects, each of a distinct colour, with a shape and a
size, drawn at a jittered position over a noisy background. For every image we write five
reference captions (COCO caption JSON) and VQA questions of six types with ten annotator
answers each (VQAv2 questions + annotations JSON), so the readers in
:mod:`mmskip.data.formats` read these files and real COCO / VQAv2 alike.

Every scene also has a short textual description (``small red circle 1 4, ...``): the tiny
LLM is pretrained on description + question/caption text only, never on pixels, and the
mapper's soft prompt later takes the description's place. Extra text-only scenes
(``text_scenes.json``) give the LLM more text than there are images.

Idea: Santoro et al. 2017, "A simple neural network module for relational reasoning"
(Sort-of-CLEVR); answer disagreement modelled on VQAv2's ten annotators.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mmskip.io import atomic_dir, dumps_json
from mmskip.params import SPLITS, ScenesConfig

log = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 215, 220),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 5, "large": 8}  # radius in pixels at image_size 48; scaled with the image
QUESTION_TYPES = ("color", "shape", "count", "exist", "relation", "nearest")
ANSWER_TYPES = {"color": "other", "shape": "other", "count": "number", "exist": "yes/no",
                "relation": "yes/no", "nearest": "other"}
GRID = 6  # descriptions give positions on a GRID x GRID grid (column, row)

# Alternatives real annotators give: synonyms, formatting variants, plausible mistakes.
SYNONYMS = {
    "purple": ["violet"], "cyan": ["light blue", "teal"], "yellow": ["gold"],
    "green": ["lime"], "red": ["Red"], "blue": ["Blue"],
    "circle": ["round", "disc"], "square": ["box", "rectangle"], "triangle": ["pyramid"],
    "yes": ["Yes.", "yes"], "no": ["No", "no."],
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]
# Probability that one annotator deviates from the canonical answer, per question type.
DISAGREEMENT = {"color": 0.08, "shape": 0.10, "count": 0.20, "exist": 0.06,
                "relation": 0.15, "nearest": 0.20}


@dataclass
class SceneObject:
    color: str
    shape: str
    size: str
    x: float  # centre, pixels
    y: float
    radius: float

    def cell(self, image_size: int) -> tuple[int, int]:
        """(column, row) on the GRID x GRID description grid."""
        col = min(GRID - 1, int(self.x * GRID / image_size))
        row = min(GRID - 1, int(self.y * GRID / image_size))
        return col, row


@dataclass
class Scene:
    image_id: int
    objects: list[SceneObject] = field(default_factory=list)


# ----------------------------------------------------------------------------- sampling

def sample_scene(rng: np.random.Generator, image_id: int, cfg: ScenesConfig) -> Scene:
    """Place objects with distinct colours at non-overlapping jittered positions."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    colors = rng.choice(len(COLORS), size=n, replace=False)
    scale = cfg.image_size / 48
    objects: list[SceneObject] = []
    for c in colors:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = ("small", "large")[int(rng.integers(2))]
        radius = SIZES[size] * scale
        for _ in range(200):  # rejection sampling; 5 objects always fit at 48 px
            x, y = rng.uniform(radius + 1, cfg.image_size - radius - 1, size=2)
            if all(math.hypot(x - o.x, y - o.y) > radius + o.radius + 2 * scale for o in objects):
                break
        else:
            continue
        objects.append(SceneObject(list(COLORS)[int(c)], shape, size, float(x), float(y), float(radius)))
    # Canonical order: the palette's colour order, so a description is a function of the scene.
    objects.sort(key=lambda o: list(COLORS).index(o.color))
    return Scene(image_id=image_id, objects=objects)


def draw_objects(draw: ImageDraw.ImageDraw, objects: list[SceneObject], fills: list) -> None:
    """Draw each object with its fill (an RGB colour, or a label id on a label map)."""
    for o, fill in zip(objects, fills):
        if o.shape == "circle":
            draw.ellipse((o.x - o.radius, o.y - o.radius, o.x + o.radius, o.y + o.radius), fill=fill)
        elif o.shape == "square":
            r = o.radius * 0.85
            draw.rectangle((o.x - r, o.y - r, o.x + r, o.y + r), fill=fill)
        else:
            draw.polygon([(o.x, o.y - o.radius), (o.x - o.radius, o.y + o.radius * 0.8),
                          (o.x + o.radius, o.y + o.radius * 0.8)], fill=fill)


def render(scene: Scene, rng: np.random.Generator, cfg: ScenesConfig) -> Image.Image:
    """Draw the scene over a noisy dark background."""
    size = cfg.image_size
    background = rng.normal(60.0, cfg.noise_std, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(background, mode="RGB")
    draw_objects(ImageDraw.Draw(image), scene.objects, [COLORS[o.color] for o in scene.objects])
    return image


def label_map(objects: list[SceneObject], image_size: int) -> np.ndarray:
    """(H, W) uint8 map: 0 for background, i+1 where object i is drawn."""
    image = Image.new("L", (image_size, image_size), 0)
    draw_objects(ImageDraw.Draw(image), objects, list(range(1, len(objects) + 1)))
    return np.asarray(image)


COLUMN_LETTERS, ROW_LETTERS = "abcdef", "ghijkl"


def describe(scene: Scene, image_size: int) -> str:
    """The short textual description the LLM is pretrained to read.

    One fixed slot per palette colour, in palette order, each two words: the object as one
    compound word (``largeredcircle``) and its grid cell (column letter a-f, row letter
    g-l: ``bh``), or ``nored none`` when the scene has no red object. Whole-object words make
    a lookup one attention step for a tiny LLM (matching words across the text needs an
    induction circuit it does not form in CPU-minutes); fixed slots give every soft-prompt
    position one meaning (query 2k writes colour k's object, 2k+1 its cell).
    """
    by_color = {o.color: o for o in scene.objects}
    parts = []
    for color in COLORS:
        if color in by_color:
            o = by_color[color]
            col, row = o.cell(image_size)
            parts.append(f"{o.size}{o.color}{o.shape} {COLUMN_LETTERS[col]}{ROW_LETTERS[row]}")
        else:
            parts.append(f"no{color} none")
    return " ".join(parts) + "."


# ----------------------------------------------------------------------------- captions

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(o: SceneObject, rng: np.random.Generator) -> str:
    size = {"small": ["small", "little", "small"], "large": ["large", "big", "large"]}[o.size]
    words = [str(rng.choice(size)), o.color, o.shape] if rng.random() < 0.7 else [o.color, o.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions_for(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """Five varied reference captions from templates and synonyms."""
    objs = scene.objects
    k = len(objs)
    picture = ["picture", "image", "photo", "drawing"]
    templates = [
        lambda ph: f"{_join(ph)}",
        lambda ph: f"{_article(p := str(rng.choice(picture)))} {p} of {_join(ph)}",
        lambda ph: f"there are {NUMBER_WORDS[k]} shapes: {_join(ph)}",
        lambda ph: f"{NUMBER_WORDS[k]} colored shapes on a dark background",
        lambda ph: f"{_join(ph)} on a dark background",
        lambda ph: f"{ph[0]} next to {_join(ph[1:])}" if k > 1 else f"a single {objs[0].color} {objs[0].shape}",
    ]
    order = rng.permutation(len(templates))[:n]
    captions = []
    for t in order:
        phrases = [_phrase(objs[i], rng) for i in rng.permutation(k)]
        captions.append(templates[int(t)](phrases))
    return captions


# ----------------------------------------------------------------------------- questions

def _left_of(a: SceneObject, b: SceneObject, image_size: int) -> bool | None:
    """True/False when the two objects lie in different grid columns, else None (ambiguous)."""
    ca, cb = a.cell(image_size)[0], b.cell(image_size)[0]
    return None if ca == cb else ca < cb


def _nearest(o: SceneObject, others: list[SceneObject]) -> SceneObject | None:
    """The clearly nearest other object (1.5x margin over the runner-up), else None."""
    if not others:
        return None
    dists = sorted((math.hypot(o.x - p.x, o.y - p.y), i) for i, p in enumerate(others))
    if len(dists) > 1 and dists[1][0] < 1.5 * dists[0][0]:
        return None
    return others[dists[0][1]]


def make_question(kind: str, scene: Scene, rng: np.random.Generator, image_size: int):
    """(question, canonical answer, candidate wrong answers) for one type, or None if impossible."""
    objs = scene.objects
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    present_colors = [o.color for o in objs]
    if kind == "color":
        unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not unique:
            return None
        o = pick(unique)
        q = pick([f"What color is the {o.shape}?", f"What is the color of the {o.shape}?",
                  f"Which color does the {o.shape} have?"])
        return q, o.color, [c for c in COLORS if c != o.color]
    if kind == "shape":
        o = pick(objs)
        q = pick([f"What shape is the {o.color} object?", f"What is the shape of the {o.color} thing?",
                  f"Which shape is {o.color}?"])
        return q, o.shape, [s for s in SHAPES if s != o.shape]
    if kind == "count":
        if rng.random() < 0.3:
            q, n = pick(["How many objects are there?", "How many shapes are in the picture?"]), len(objs)
        else:
            s = pick(SHAPES)
            n = sum(o.shape == s for o in objs)
            q = pick([f"How many {s}s are there?", f"How many {s}s are in the picture?"])
        return q, str(n), [str(max(0, n - 1)), str(n + 1)]
    if kind == "exist":
        if rng.random() < 0.5:
            c = pick(list(COLORS))
            q, ans = pick([f"Is there a {c} object?", f"Is there anything {c}?"]), c in present_colors
        else:
            s = pick(SHAPES)
            q, ans = pick([f"Is there a {s}?", f"Are there any {s}s?"]), any(o.shape == s for o in objs)
        ans = "yes" if ans else "no"
        return q, ans, ["no" if ans == "yes" else "yes"]
    if kind == "relation":
        pairs = [(a, b) for a in objs for b in objs if a is not b and _left_of(a, b, image_size) is not None]
        if not pairs:
            return None
        a, b = pick(pairs)
        if rng.random() < 0.5:
            q, ans = f"Is the {a.color} object left of the {b.color} object?", _left_of(a, b, image_size)
        else:
            q, ans = f"Is the {a.color} object right of the {b.color} object?", not _left_of(a, b, image_size)
        ans = "yes" if ans else "no"
        return q, ans, ["no" if ans == "yes" else "yes"]
    if kind == "nearest":
        candidates = [(o, n) for o in objs if (n := _nearest(o, [p for p in objs if p is not o]))]
        if len(objs) < 3 or not candidates:
            return None
        o, n = pick(candidates)
        q = pick([f"What color is the object closest to the {o.color} object?",
                  f"What color is the object nearest to the {o.color} one?"])
        return q, n.color, [p.color for p in objs if p is not o and p is not n]
    raise ValueError(f"question type {kind!r}: allowed {QUESTION_TYPES}")


def annotate(kind: str, answer: str, wrong: list[str], rng: np.random.Generator,
             disagreement: dict[str, float] = DISAGREEMENT, synonyms: dict[str, list[str]] = SYNONYMS) -> list[str]:
    """Ten annotator answers: mostly the canonical one, some synonyms, variants and mistakes (``disagreement``:
    the chance one annotator deviates, per question type)."""
    answers = []
    for _ in range(10):
        if rng.random() >= disagreement[kind]:
            answers.append(answer)
            continue
        options = list(synonyms.get(answer, []))
        if kind == "count":
            options.append(NUMBER_WORDS[int(answer)])
        options += wrong
        answers.append(options[int(rng.integers(len(options)))] if options else answer)
    return answers


def ask(kinds: tuple[str, ...], make, limit: int, rng: np.random.Generator, annotator=annotate) -> list[dict]:
    """Up to ``limit`` questions, cycling through ``kinds`` from a random one (``make(kind)``: (question,
    canonical answer, wrong answers), or None where impossible; impossible and repeated ones skipped), each with
    ``annotator``'s ten answers."""
    start = int(rng.integers(len(kinds)))
    out, seen = [], set()
    for step in range(len(kinds) * 3):
        if len(out) == limit:
            break
        kind = kinds[(start + step) % len(kinds)]
        made = make(kind)
        if made is None or made[0] in seen:
            continue
        q, ans, wrong = made
        seen.add(q)
        out.append({"question": q, "question_type": kind, "answer": ans, "answers": annotator(kind, ans, wrong, rng)})
    return out


def questions_for(scene: Scene, rng: np.random.Generator, cfg: ScenesConfig) -> list[dict]:
    """Up to ``questions_per_image`` questions, cycling through the types (impossible ones skipped)."""
    return ask(QUESTION_TYPES, lambda kind: make_question(kind, scene, rng, cfg.image_size), cfg.questions_per_image,
               rng)


# ----------------------------------------------------------------------------- writing

def _most_common(answers: list[str]) -> str:
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=lambda a: (counts[a], -answers.index(a)))


@dataclass(frozen=True)
class Recipe:
    """How one generated dataset (the scenes, the clips, the sounds) makes an example: ``sample(rng, id)`` draws
    it, ``save(example, rng, path)`` renders and writes its media file, ``entry(example)`` gives its caption-file
    image entry's extra fields, ``captions(example, rng)`` and ``questions(example, rng)`` its texts, ``record``
    its record with its description (``scenes_{split}.json``, ``text_scenes.json``)."""

    name: str  # the progress bars' and the log's
    noun: str  # what the log calls its examples
    media: str  # the folder of the media files: images, videos, audio
    suffix: str  # their extension
    data_type: str  # the VQA files' data_type
    answer_types: dict[str, str]
    sample: Callable
    save: Callable
    entry: Callable
    captions: Callable
    questions: Callable
    record: Callable
    file_in_record: bool = True  # a record names its file (the scenes' are found by id)


def generate(out: Path, seed: int, sizes: dict[str, int], num_text: int, info: dict, recipe: Recipe) -> None:
    """Every split of a generated dataset into ``out`` (replaced whole, atomically), ids and question ids numbered
    across the splits, each split's examples drawn from their own generator (``[seed, split index]``), then
    ``num_text`` text-only records (``[seed, len(SPLITS)]``) for the LLM's pretraining."""
    with atomic_dir(out) as tmp:
        next_id, next_question = 1, 1
        for split_index, split in enumerate(SPLITS):
            rng = np.random.default_rng([seed, split_index])
            (tmp / recipe.media / split).mkdir(parents=True)
            images, caption_anns, questions, vqa_anns, records = [], [], [], [], []
            for _ in tqdm(range(sizes[split]), desc=f"{recipe.name} {split}", mininterval=2):
                example = recipe.sample(rng, next_id)
                file_name = f"{split}/{next_id:06d}{recipe.suffix}"
                recipe.save(example, rng, tmp / recipe.media / file_name)
                images.append({"id": next_id, "file_name": file_name, **recipe.entry(example)})
                for caption in recipe.captions(example, rng):
                    caption_anns.append({"id": len(caption_anns) + 1, "image_id": next_id, "caption": caption})
                for qa in recipe.questions(example, rng):
                    question, annotation = vqa_records(next_question, next_id, qa, recipe.answer_types)
                    questions.append(question)
                    vqa_anns.append(annotation)
                    next_question += 1
                named = {"file_name": file_name} if recipe.file_in_record else {}
                records.append({**recipe.record(example), **named})
                next_id += 1
            write_split(tmp, split, info, recipe.data_type, images, caption_anns, questions, vqa_anns, records)
            log.info("%s: %d %s, %d questions, %d captions", split, len(images), recipe.noun, len(questions),
                     len(caption_anns))
        rng = np.random.default_rng([seed, len(SPLITS)])
        text = []
        for i in tqdm(range(num_text), desc=f"text {recipe.name}", mininterval=2):
            example = recipe.sample(rng, -(i + 1))
            record = recipe.record(example)
            record["captions"] = recipe.captions(example, rng)
            record["questions"] = [{k: qa[k] for k in ("question", "question_type", "answer")}
                                   for qa in recipe.questions(example, rng)]
            text.append(record)
        (tmp / "text_scenes.json").write_text(dumps_json({"info": info, "scenes": text}, True))


def make_scenes(out: Path, seed: int, cfg: ScenesConfig) -> None:
    """Generate all splits into ``out`` (replaced whole, atomically)."""
    info = {"description": "mmskip procedural scenes", "version": "1.0", "seed": seed,
            "config": dataclasses.asdict(cfg)}
    recipe = Recipe("scenes", "images", "images", ".png", "mmskip-scenes", ANSWER_TYPES,
                    sample=lambda rng, image_id: sample_scene(rng, image_id, cfg),
                    save=lambda scene, rng, path: render(scene, rng, cfg).save(path, format="PNG"),
                    entry=lambda scene: {"width": cfg.image_size, "height": cfg.image_size},
                    captions=captions_for, questions=lambda scene, rng: questions_for(scene, rng, cfg),
                    record=lambda scene: _scene_record(scene, cfg), file_in_record=False)
    generate(out, seed, {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}, cfg.num_text_scenes,
             info, recipe)


def vqa_records(question_id: int, image_id: int, qa: dict, answer_types: dict[str, str]) -> tuple[dict, dict]:
    """A generated question's VQAv2 question and annotation records (``qa``: question, type, ten answers)."""
    question = {"image_id": image_id, "question": qa["question"], "question_id": question_id}
    annotation = {
        "question_id": question_id, "image_id": image_id, "question_type": qa["question_type"],
        "answer_type": answer_types[qa["question_type"]], "multiple_choice_answer": _most_common(qa["answers"]),
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(qa["answers"])],
    }
    return question, annotation


def write_split(folder: Path, split: str, info: dict, data_type: str, images: list, caption_anns: list,
                questions: list, vqa_anns: list, records: list) -> None:
    """One split of a generated dataset in the real datasets' formats: COCO captions, VQAv2 questions and
    annotations, and the records with their descriptions (``scenes_{split}.json``)."""
    ann = folder / "annotations"
    ann.mkdir(exist_ok=True)
    (ann / f"captions_{split}.json").write_text(dumps_json(
        {"info": info, "licenses": [], "images": images, "annotations": caption_anns}, True))
    (ann / f"vqa_questions_{split}.json").write_text(dumps_json(
        {"info": info, "task_type": "Open-Ended", "data_type": data_type,
         "data_subtype": split, "license": {}, "questions": questions}, True))
    (ann / f"vqa_annotations_{split}.json").write_text(dumps_json(
        {"info": info, "data_type": data_type, "data_subtype": split,
         "license": {}, "annotations": vqa_anns}, True))
    (folder / f"scenes_{split}.json").write_text(dumps_json({"info": info, "scenes": records}, True))


def _scene_record(scene: Scene, cfg: ScenesConfig) -> dict:
    return {"image_id": scene.image_id, "description": describe(scene, cfg.image_size),
            "objects": [{**dataclasses.asdict(o), "x": round(o.x, 3), "y": round(o.y, 3),
                         "radius": round(o.radius, 3), "cell": list(o.cell(cfg.image_size))}
                        for o in scene.objects]}
