"""Procedural sound dataset: short clips of notes in sequence, in the image datasets' formats.

A clip is ``slots`` time slots of ``slot_seconds`` each; 1 to ``slots`` of them hold a note, the others are
silent. A note has a pitch (low, mid, high), a timbre (sine, pulse: a square wave, saw; band-limited additive
synthesis, so nothing aliases), a loudness (soft, loud) and a duration (short, long), and starts at a jittered time
inside its slot, over a noise floor. Every clip gets five reference captions (COCO caption JSON) and questions that need
listening, with ten annotator answers each (VQAv2 questions + annotations JSON): how many notes (of a timbre, a
loudness), the timbre or pitch of the first or last note, whether there is a note of some kind, whether the first
note is higher or louder than the last. The clips are WAV files under ``audio/{split}/``, listed as the caption
file's images, so the feature cache reads them as it reads Clotho's (:mod:`mmskip.features.cache`).

Like the scenes (:mod:`mmskip.data.scenes`), every clip has a short description the LLM is pretrained to read
(``loudhighpulse long silence none softlowsine short silence none.``: per slot, the note as one compound word and
its duration, or ``silence none``), and extra text-only clips (``text_scenes.json``) give it more text.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmskip.data.scenes import NUMBER_WORDS, Recipe, annotate, ask, generate
from mmskip.params import SoundsConfig


PITCHES = {"low": 300.0, "mid": 600.0, "high": 1200.0}  # fundamental, Hz
TIMBRES = ("sine", "pulse", "saw")  # words of their own: "square" is a shape of the scenes
LOUDNESS = {"soft": 0.2, "loud": 0.7}  # peak amplitude
DURATIONS = {"short": 0.4, "long": 0.8}  # fraction of a slot
SILENCE = "silence none"  # the description of an empty slot
QUESTION_TYPES = ("count", "first", "last", "exist", "compare")
ANSWER_TYPES = {"count": "number", "first": "other", "last": "other", "exist": "yes/no", "compare": "yes/no"}
SYNONYMS = {"saw": ["sawtooth"], "sine": ["pure"], "pulse": ["square"], "high": ["higher"], "low": ["deep"],
            "mid": ["medium", "middle"], "yes": ["Yes", "yes."], "no": ["No", "no."]}
DISAGREEMENT = {"count": 0.15, "first": 0.1, "last": 0.1, "exist": 0.06, "compare": 0.15}
ATTACK = 0.01  # seconds of linear fade in and out


@dataclass
class Note:
    slot: int
    pitch: str
    timbre: str
    loudness: str
    duration: str
    start: float  # seconds from the clip's start

    def word(self) -> str:
        return f"{self.loudness}{self.pitch}{self.timbre}"

    def seconds(self, cfg: SoundsConfig) -> float:
        return DURATIONS[self.duration] * cfg.slot_seconds


@dataclass
class Sound:
    sound_id: int
    notes: list[Note]  # in time order


def clip_seconds(cfg: SoundsConfig) -> float:
    return cfg.slots * cfg.slot_seconds


def sample_sound(rng: np.random.Generator, sound_id: int, cfg: SoundsConfig) -> Sound:
    """Notes in a random subset of the slots, each with its attributes and a start inside its slot."""
    n = int(rng.integers(cfg.min_notes, cfg.max_notes + 1))
    notes = []
    for slot in sorted(int(s) for s in rng.choice(cfg.slots, size=n, replace=False)):
        pitch = list(PITCHES)[int(rng.integers(len(PITCHES)))]
        timbre = TIMBRES[int(rng.integers(len(TIMBRES)))]
        loudness = list(LOUDNESS)[int(rng.integers(len(LOUDNESS)))]
        duration = list(DURATIONS)[int(rng.integers(len(DURATIONS)))]
        slack = cfg.slot_seconds * (1 - DURATIONS[duration]) - 2 * ATTACK
        start = slot * cfg.slot_seconds + ATTACK + float(rng.uniform(0, slack))
        notes.append(Note(slot, pitch, timbre, loudness, duration, round(start, 4)))
    return Sound(sound_id, notes)


def tone(timbre: str, frequency: float, t: np.ndarray, rate: int) -> np.ndarray:
    """A band-limited waveform of peak about 1: harmonics up to the Nyquist frequency only."""
    if timbre == "sine":
        return np.sin(2 * np.pi * frequency * t)
    # a pulse is a square wave: odd harmonics alone; a saw has them all
    harmonics = [k for k in range(1, int(rate / 2 / frequency) + 1) if timbre == "saw" or k % 2 == 1]
    wave = sum(np.sin(2 * np.pi * k * frequency * t) / k for k in harmonics)
    return wave / np.abs(wave).max()


def render(sound: Sound, rng: np.random.Generator, cfg: SoundsConfig) -> np.ndarray:
    """The clip's samples (float32 in [-1, 1]) at ``cfg.sample_rate``."""
    rate = cfg.sample_rate
    out = rng.normal(0.0, cfg.noise_std, size=int(round(clip_seconds(cfg) * rate)))
    for note in sound.notes:
        length = int(round(note.seconds(cfg) * rate))
        t = np.arange(length) / rate
        ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / ATTACK)
        begin = int(round(note.start * rate))
        out[begin : begin + length] += LOUDNESS[note.loudness] * ramp * tone(note.timbre, PITCHES[note.pitch], t, rate)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def describe(sound: Sound, cfg: SoundsConfig) -> str:
    """Per slot, in time order: the note as one compound word (``loudhighpulse``) and its duration, or
    ``silence none`` (fixed slots give every soft-prompt position one meaning, as the scenes' colour slots do)."""
    by_slot = {n.slot: n for n in sound.notes}
    return " ".join(f"{by_slot[s].word()} {by_slot[s].duration}" if s in by_slot else SILENCE
                    for s in range(cfg.slots)) + "."


# ----------------------------------------------------------------------------- captions

def _phrase(note: Note, rng: np.random.Generator) -> str:
    noun = str(rng.choice(["note", "tone", "beep"]))
    words = [note.loudness, note.pitch, note.timbre] if rng.random() < 0.7 else [note.pitch, note.timbre]
    if rng.random() < 0.3:
        words.insert(0, note.duration)
    return f"a {' '.join(words)} {noun}"


def captions_for(sound: Sound, rng: np.random.Generator, n: int = 5) -> list[str]:
    """Five varied reference captions, the notes in time order."""
    notes, k = sound.notes, len(sound.notes)
    count = f"{NUMBER_WORDS[k]} note" + ("s" if k > 1 else "")
    templates = [
        lambda ph: " then ".join(ph),
        lambda ph: f"{count}: " + ", ".join(ph),
        lambda ph: f"{ph[0]} followed by " + " and ".join(ph[1:]) if k > 1 else f"a single {ph[0][2:]}",
        lambda ph: f"{count} over a quiet hiss, starting with {ph[0]}",
        lambda ph: f"{count}, the last one {ph[-1]}",
        lambda ph: f"{ph[0]} and then silence" if k == 1 else f"{count}, from {notes[0].pitch} to {notes[-1].pitch}",
    ]
    order = rng.permutation(len(templates))[:n]
    return [templates[int(t)]([_phrase(note, rng) for note in notes]) for t in order]


# ----------------------------------------------------------------------------- questions

def make_question(kind: str, sound: Sound, rng: np.random.Generator):
    """(question, canonical answer, candidate wrong answers) for one type, or None if impossible."""
    notes = sound.notes
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if kind == "count":
        attribute = pick(["all", "timbre", "loudness"])
        if attribute == "all":
            q, n = pick(["How many notes are there?", "How many notes do you hear?"]), len(notes)
        elif attribute == "timbre":
            t = pick(TIMBRES)
            q, n = f"How many {t} notes are there?", sum(note.timbre == t for note in notes)
        else:
            loud = pick(list(LOUDNESS))
            q, n = f"How many {loud} notes are there?", sum(note.loudness == loud for note in notes)
        return q, str(n), [str(max(0, n - 1)), str(n + 1)]
    if kind in ("first", "last"):
        note = notes[0] if kind == "first" else notes[-1]
        if rng.random() < 0.5:
            q = pick([f"What is the timbre of the {kind} note?", f"Which timbre does the {kind} note have?"])
            return q, note.timbre, [t for t in TIMBRES if t != note.timbre]
        q = pick([f"What is the pitch of the {kind} note?", f"How high is the {kind} note?"])
        return q, note.pitch, [p for p in PITCHES if p != note.pitch]
    if kind == "exist":
        attribute = pick(["timbre", "pitch", "loudness"])
        value = pick({"timbre": TIMBRES, "pitch": list(PITCHES), "loudness": list(LOUDNESS)}[attribute])
        ans = "yes" if any(getattr(note, attribute) == value for note in notes) else "no"
        q = pick([f"Is there a {value} note?", f"Do you hear a {value} note?"])
        return q, ans, ["no" if ans == "yes" else "yes"]
    if kind == "compare":
        first, last = notes[0], notes[-1]
        if len(notes) < 2:
            return None
        if first.pitch != last.pitch and rng.random() < 0.6:
            order = list(PITCHES)
            higher = order.index(first.pitch) > order.index(last.pitch)
            if rng.random() < 0.5:
                q, ans = "Is the first note higher than the last note?", higher
            else:
                q, ans = "Is the first note lower than the last note?", not higher
        elif first.loudness != last.loudness:
            q, ans = "Is the first note louder than the last note?", first.loudness == "loud"
        else:
            return None
        ans = "yes" if ans else "no"
        return q, ans, ["no" if ans == "yes" else "yes"]
    raise ValueError(f"question type {kind!r}: allowed {QUESTION_TYPES}")


def questions_for(sound: Sound, rng: np.random.Generator, cfg: SoundsConfig) -> list[dict]:
    """Up to ``questions_per_clip`` questions, cycling through the types (impossible ones skipped)."""
    return ask(QUESTION_TYPES, lambda kind: make_question(kind, sound, rng), cfg.questions_per_clip, rng,
               functools.partial(annotate, disagreement=DISAGREEMENT, synonyms=SYNONYMS))


# ----------------------------------------------------------------------------- writing

def make_sounds(out: Path, seed: int, cfg: SoundsConfig) -> None:
    """Generate all splits into ``out`` (replaced whole, atomically)."""
    import soundfile

    info = {"description": "mmskip procedural sounds", "version": "1.0", "seed": seed,
            "config": dataclasses.asdict(cfg)}
    recipe = Recipe("sounds", "clips", "audio", ".wav", "mmskip-sounds", ANSWER_TYPES,
                    sample=lambda rng, sound_id: sample_sound(rng, sound_id, cfg),
                    save=lambda sound, rng, path: soundfile.write(path, render(sound, rng, cfg), cfg.sample_rate,
                                                                  subtype="PCM_16"),
                    entry=lambda sound: {}, captions=captions_for,
                    questions=lambda sound, rng: questions_for(sound, rng, cfg),
                    record=lambda sound: _record(sound, cfg))
    generate(out, seed, {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}, cfg.num_text_sounds,
             info, recipe)


def _record(sound: Sound, cfg: SoundsConfig) -> dict:
    return {"image_id": sound.sound_id, "description": describe(sound, cfg),
            "notes": [dataclasses.asdict(n) for n in sound.notes]}
