"""Procedural video dataset: short clips of the scenes' objects appearing and moving, in the datasets' formats.

A clip is ``num_frames`` frames of ``frame_size`` pixels at ``fps`` frames a second. It holds 1 to
``max_objects`` objects of distinct colours, each with a shape of the scenes (:mod:`mmskip.data.scenes`) and a
motion: still, or moving left, right, up or down by ``speed`` pixels a frame. The first object is there from the
first frame; each other one appears at a later frame of the clip's first half and stays; objects never overlap.
Every clip gets five reference captions (COCO caption JSON) and questions that need time, with ten annotator
answers each (VQAv2 questions + annotations JSON): how many objects move (or stay still, or are there), which way
an object moves, the colour or shape of the object that appears first or last, whether something moves some way,
and which object moves some way. The clips are lossless FFV1 videos in Matroska files under ``videos/{split}/``
(bit-exact: the same seed gives the same bytes), listed as the caption file's images, so the feature cache reads
them as it reads MSR-VTT's (:func:`mmskip.data.video.load_frames`: at ``fps`` over one second, every frame).

Like the scenes, every clip has a short description the LLM is pretrained to read (``redcirclestill bluesquareleft
none.``: per slot, in order of appearance, the object and its motion as one compound word, or ``none``), and
extra text-only clips (``text_scenes.json``) give it more text.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmskip.data.scenes import (COLORS, NUMBER_WORDS, SHAPES, SYNONYMS as SCENE_SYNONYMS, Recipe, SceneObject,
                                annotate, ask, draw_objects, generate)
from mmskip.params import ClipsConfig


MOTIONS = {"still": (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) a frame
DIRECTIONS = tuple(m for m in MOTIONS if m != "still")
RADIUS = 5.0  # pixels at frame_size 32; scaled with the frame
QUESTION_TYPES = ("count", "direction", "first", "last", "exist", "which")
ANSWER_TYPES = {"count": "number", "direction": "other", "first": "other", "last": "other", "exist": "yes/no",
                "which": "other"}
SYNONYMS = {**SCENE_SYNONYMS, "left": ["leftward"], "right": ["rightward"], "up": ["upward", "upwards"],
            "down": ["downward", "downwards"]}
DISAGREEMENT = {"count": 0.15, "direction": 0.1, "first": 0.1, "last": 0.1, "exist": 0.06, "which": 0.1}
CODEC, CONTAINER = "ffv1", "matroska"  # lossless, and bit-exact with +bitexact


@dataclass
class Mover:
    color: str
    shape: str
    motion: str
    appears: int  # the frame it appears at
    x: float  # centre at its first frame, pixels
    y: float

    def word(self) -> str:
        return f"{self.color}{self.shape}{self.motion}"

    def at(self, frame: int, cfg: ClipsConfig) -> SceneObject | None:
        """The object as drawn at ``frame`` (None before it appears)."""
        if frame < self.appears:
            return None
        dx, dy = MOTIONS[self.motion]
        steps = (frame - self.appears) * cfg.speed
        return SceneObject(self.color, self.shape, "small", self.x + dx * steps, self.y + dy * steps, radius(cfg))


@dataclass
class Clip:
    clip_id: int
    objects: list[Mover]  # in order of appearance


def radius(cfg: ClipsConfig) -> float:
    return RADIUS * cfg.frame_size / 32


def sample_clip(rng: np.random.Generator, clip_id: int, cfg: ClipsConfig) -> Clip:
    """Objects of distinct colours, appearing at distinct frames (the first at frame 0), each on a path that stays
    inside the frame and clear of the others at every frame."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    colors = [list(COLORS)[int(c)] for c in rng.choice(len(COLORS), size=n, replace=False)]
    later = sorted(int(f) for f in rng.choice(np.arange(1, max(2, cfg.num_frames // 2 + 1)), size=n - 1,
                                              replace=False)) if n > 1 else []
    r = radius(cfg)
    objects: list[Mover] = []
    for color, appears in zip(colors, [0, *later]):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        motion = list(MOTIONS)[int(rng.integers(len(MOTIONS)))]
        travel = (cfg.num_frames - 1 - appears) * cfg.speed
        dx, dy = MOTIONS[motion]
        for _ in range(200):  # rejection sampling of the start, so the whole path fits and clears the others
            lo_x, hi_x = r + 1 + max(0, -dx) * travel, cfg.frame_size - r - 1 - max(0, dx) * travel
            lo_y, hi_y = r + 1 + max(0, -dy) * travel, cfg.frame_size - r - 1 - max(0, dy) * travel
            x, y = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
            mover = Mover(color, shape, motion, appears, x, y)
            if all(_clear(mover, other, cfg) for other in objects):
                break
        else:
            continue
        objects.append(mover)
    return Clip(clip_id, objects)


def _clear(a: Mover, b: Mover, cfg: ClipsConfig) -> bool:
    for frame in range(cfg.num_frames):
        oa, ob = a.at(frame, cfg), b.at(frame, cfg)
        if oa and ob and np.hypot(oa.x - ob.x, oa.y - ob.y) <= oa.radius + ob.radius + 2:
            return False
    return True


def frame_objects(clip: Clip, frame: int, cfg: ClipsConfig) -> list[SceneObject]:
    return [o for m in clip.objects if (o := m.at(frame, cfg)) is not None]


def render(clip: Clip, rng: np.random.Generator, cfg: ClipsConfig) -> list[np.ndarray]:
    """The clip's frames, (H, W, 3) uint8 each: the objects over a noisy dark background (fresh noise a frame)."""
    size, frames = cfg.frame_size, []
    for frame in range(cfg.num_frames):
        background = rng.normal(60.0, cfg.noise_std, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(background, mode="RGB")
        objects = frame_objects(clip, frame, cfg)
        draw_objects(ImageDraw.Draw(image), objects, [COLORS[o.color] for o in objects])
        frames.append(np.asarray(image))
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """A lossless video of ``frames`` (bit-exact: the same frames give the same bytes)."""
    import av

    with av.open(str(path), "w", format=CONTAINER, container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(CODEC, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def describe(clip: Clip, cfg: ClipsConfig) -> str:
    """Per slot, in order of appearance: the object and its motion as one compound word (``bluesquareleft``), or
    ``none`` (fixed slots give every soft-prompt position one meaning, as the scenes' colour slots do)."""
    words = [m.word() for m in clip.objects] + ["none"] * (cfg.max_objects - len(clip.objects))
    return " ".join(words) + "."


# ----------------------------------------------------------------------------- captions

def _phrase(m: Mover, rng: np.random.Generator) -> str:
    if m.motion == "still":
        motion = str(rng.choice(["standing still", "that does not move", "staying still"]))
    else:
        motion = str(rng.choice([f"moving {m.motion}", f"going {m.motion}", f"that moves {m.motion}"]))
    return f"a {m.color} {m.shape} {motion}"


def captions_for(clip: Clip, rng: np.random.Generator, n: int = 5) -> list[str]:
    """Five varied reference captions, the objects in order of appearance."""
    objs, k = clip.objects, len(clip.objects)
    count = f"{NUMBER_WORDS[k]} object" + ("s" if k > 1 else "")
    moving = sum(m.motion != "still" for m in objs)
    templates = [
        lambda ph: " then ".join(ph),
        lambda ph: f"{count}: " + ", ".join(ph),
        lambda ph: f"{ph[0]}, then " + " and ".join(ph[1:]) + " appears" if k > 1 else f"a video of {ph[0]}",
        lambda ph: f"{count}, {NUMBER_WORDS[moving]} of them moving, first {ph[0]}",
        lambda ph: f"{count} on a dark background, the last one {ph[-1]}",
        lambda ph: "a video of " + " and ".join(ph),
    ]
    order = rng.permutation(len(templates))[:n]
    return [templates[int(t)]([_phrase(m, rng) for m in objs]) for t in order]


# ----------------------------------------------------------------------------- questions

def make_question(kind: str, clip: Clip, rng: np.random.Generator):
    """(question, canonical answer, candidate wrong answers) for one type, or None if impossible."""
    objs = clip.objects
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    moving = [m for m in objs if m.motion != "still"]
    if kind == "count":
        which = pick(["all", "moving", "still"])
        if which == "all":
            q, n = pick(["How many objects are there?", "How many objects do you see?"]), len(objs)
        elif which == "moving":
            q, n = pick(["How many objects move?", "How many objects are moving?"]), len(moving)
        else:
            q, n = "How many objects stay still?", len(objs) - len(moving)
        return q, str(n), [str(max(0, n - 1)), str(n + 1)]
    if kind == "direction":
        if not moving:
            return None
        m = pick(moving)
        q = pick([f"Which way does the {m.color} object move?", f"In which direction does the {m.color} {m.shape} "
                  "move?"])
        return q, m.motion, [d for d in DIRECTIONS if d != m.motion]
    if kind in ("first", "last"):
        m = objs[0] if kind == "first" else objs[-1]
        if rng.random() < 0.6:
            q = pick([f"What color is the object that appears {kind}?", f"What color is the {kind} object?"])
            return q, m.color, [c for c in COLORS if c != m.color]
        q = pick([f"What shape appears {kind}?", f"What is the shape of the {kind} object?"])
        return q, m.shape, [s for s in SHAPES if s != m.shape]
    if kind == "exist":
        if rng.random() < 0.5:
            d = pick(DIRECTIONS)
            q, ans = f"Is there an object moving {d}?", any(m.motion == d for m in objs)
        else:
            m = pick(objs)
            q, ans = pick([f"Does the {m.color} {m.shape} move?", f"Is the {m.color} object moving?"]), m in moving
        ans = "yes" if ans else "no"
        return q, ans, ["no" if ans == "yes" else "yes"]
    if kind == "which":
        unique = [m for m in moving if sum(o.motion == m.motion for o in objs) == 1]
        if not unique:
            return None
        m = pick(unique)
        q = pick([f"What color is the object moving {m.motion}?", f"Which color moves {m.motion}?"])
        return q, m.color, [c for c in COLORS if c != m.color]
    raise ValueError(f"question type {kind!r}: allowed {QUESTION_TYPES}")


def questions_for(clip: Clip, rng: np.random.Generator, cfg: ClipsConfig) -> list[dict]:
    """Up to ``questions_per_clip`` questions, cycling through the types (impossible ones skipped)."""
    return ask(QUESTION_TYPES, lambda kind: make_question(kind, clip, rng), cfg.questions_per_clip, rng,
               functools.partial(annotate, disagreement=DISAGREEMENT, synonyms=SYNONYMS))


# ----------------------------------------------------------------------------- writing

def make_clips(out: Path, seed: int, cfg: ClipsConfig) -> None:
    """Generate all splits into ``out`` (replaced whole, atomically)."""
    info = {"description": "mmskip procedural clips", "version": "1.0", "seed": seed,
            "config": dataclasses.asdict(cfg)}
    recipe = Recipe("clips", "clips", "videos", ".mkv", "mmskip-clips", ANSWER_TYPES,
                    sample=lambda rng, clip_id: sample_clip(rng, clip_id, cfg),
                    save=lambda clip, rng, path: write_video(path, render(clip, rng, cfg), cfg.fps),
                    entry=lambda clip: {"width": cfg.frame_size, "height": cfg.frame_size}, captions=captions_for,
                    questions=lambda clip, rng: questions_for(clip, rng, cfg), record=lambda clip: _record(clip, cfg))
    generate(out, seed, {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}, cfg.num_text_clips,
             info, recipe)


def _record(clip: Clip, cfg: ClipsConfig) -> dict:
    return {"image_id": clip.clip_id, "description": describe(clip, cfg),
            "objects": [{**dataclasses.asdict(m), "x": round(m.x, 3), "y": round(m.y, 3)} for m in clip.objects]}
