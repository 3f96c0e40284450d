"""Every params.yaml section as a dataclass: its keys, defaults, descriptions, bounds and checks.

One place holds each fact about a parameter. A section is a dataclass whose fields are its keys;
a field's metadata gives the key's description and what it allows, in JSON Schema's words
(``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``, ``enum``, ``pattern``,
``minLength``; for a list they apply to its items). From these:

- ``params_schema`` generates ``workflow/schemas/params.schema.yaml`` (``python -m mmskip.params
  --out workflow/schemas/params.schema.yaml``), which the Snakefile checks params.yaml against
  first, for its per-key messages ("did you mean ...");
- a section checks its values against the same metadata when it is built, then the rules that
  span its keys (``checks``), and raises ``ParamsError`` naming every problem: so every `mmskip`
  command refuses what the schema refuses, under DVC too;
- ``Params`` holds the seed and every section, and the rules that span sections (``across``: the
  skip grid against the LLM's depth, the N:M patterns against its widths, ...). The Snakefile runs
  them (``params_problems``) before any job, so a value a job would trip over fails at once.

No torch, numpy or transformers here: the Snakefile and every `mmskip` command import this first.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

from mmskip.compression.names import CALIBRATIONS, MASK_SETS, RULES, SUBNET, TRAIN_VARIANTS
from mmskip.skipping.plan import (COMBINES, CONTEXT_KV, DECODES, MODES, SCOPES, SEMANTICS, TOKEN_KINDS, SkipPlan,
                                  every_kth_layer,
                                  official_layers)

SPLITS = ("train", "val", "test")
NUM_COLORS = 6  # len(mmskip.data.scenes.COLORS): a scene holds at most one object of each colour
GRIDS = ("default", "full")
TRAIN_INITS = ("baseline", "scratch")
MAPPER_OUTPUTS = ("linear", "vocab")
_NM_PATTERN = "^[0-9]+:[0-9]+$"  # N:M, e.g. "2:4" (0 < N < M is a check of its own)

SCHEMA_PATH = "workflow/schemas/params.schema.yaml"
SCHEMA_HEADER = f"""\
# GENERATED from the dataclasses of src/mmskip/params.py; do not edit. Change a key there, then run
#   python -m mmskip.params --out {SCHEMA_PATH}
# (tests/test_params.py fails while this file is stale). The Snakefile checks params.yaml against it
# before any job is scheduled (validate_params in workflow/rules/common.smk). Every key is required,
# so params.yaml stays the complete, explicit record of a run; `default` is the dataclass default.
"""

# JSON Schema keywords a key may carry (for a list: its items), in the order the schema lists them.
_KEYWORDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "enum", "pattern", "minLength")
_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}
_TYPE_WORDS = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false"}


# --- problems ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A rule that values break: the keys it reads (the one at fault first), their values, and
    what is allowed, in words ("must ...", "allowed ...")."""

    keys: tuple[str, ...]
    values: tuple[Any, ...]
    allowed: str

    def within(self, section: str) -> Problem:
        """The same problem with its keys dotted from the top of params.yaml."""
        return Problem(tuple(f"{section}.{k}" for k in self.keys), self.values, self.allowed)

    def describe(self, equals: str = "=") -> str:
        """``min_objects=4, max_objects=3: min_objects must not exceed max_objects``."""
        named = ", ".join(f"{k}{equals}{_shown(v)!r}" for k, v in zip(self.keys, self.values))
        return f"{named}: {self.allowed}"

    def __str__(self) -> str:
        return self.describe()


class ParamsError(ValueError):
    """Bad params, with every problem found (``problems``), not only the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = [str(p) for p in self.problems]
        super().__init__(lines[0] if len(lines) == 1 else "\n  - ".join([f"{len(lines)} problems:", *lines]))


def _shown(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --- keys and sections -------------------------------------------------------------------------

def param(default: Any, description: str, **allowed: Any) -> Any:
    """A params key: its default, what it means, and what it allows (JSON Schema keywords; for a
    list they constrain its items)."""
    unknown = set(allowed) - set(_KEYWORDS)
    if unknown:
        raise TypeError(f"param: unknown keyword(s) {sorted(unknown)}; allowed {list(_KEYWORDS)}")
    return field(default=default, metadata={"description": description, **allowed})


def section(cls: type, description: str, **overrides: Any) -> Any:
    """A params section (a field of ``Params``): ``cls`` with its defaults, or ``overrides``."""
    return field(default_factory=functools.partial(cls, **overrides), metadata={"description": description})


class Section:
    """Base of the params dataclasses. When built, a section checks every key against its
    field's metadata, then (if each key is fine alone) the rules across its keys, ``checks``,
    and raises ``ParamsError`` naming every problem."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if _is_list(_hints(type(self))[f.name]) and isinstance(value, list):
                setattr(self, f.name, tuple(value))  # lists from YAML compare equal to CLI tuples
        problems = self.problems()
        if problems:
            raise ParamsError(problems)

    def problems(self) -> list[Problem]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _key_problems(type(self), values) or list(self.checks())

    def checks(self) -> Iterator[Problem]:
        """Rules that span keys; each key is already known to be allowed on its own."""
        return iter(())


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


def _item_type(tp: Any) -> type:
    return typing.get_args(tp)[0]


def _key_problems(cls: type, values: Mapping[str, Any]) -> list[Problem]:
    """Keys of ``values`` that their field's type and metadata refuse (sections are not looked at)."""
    problems = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if f.name in values and not _is_section(tp):
            refusal = _refusal(tp, f.metadata, values[f.name])
            if refusal:
                problems.append(Problem((f.name,), (values[f.name],), refusal))
    return problems


def _refusal(tp: Any, meta: Mapping[str, Any], value: Any) -> str | None:
    """Why a key of type ``tp`` and metadata ``meta`` does not allow ``value``; None if it does."""
    if _is_list(tp):
        item = _item_type(tp)
        fine = (isinstance(value, (list, tuple)) and len(value) > 0
                and all(_refusal(item, meta, v) is None for v in value) and len(set(value)) == len(value))
        if not fine:
            if "enum" in meta:
                return f"allowed a non-empty subset of {list(meta['enum'])} without repeats"
            return f"allowed a non-empty list without repeats, each {allowed_words(_key_schema(item, meta, None))}"
        return None
    kind = _JSON_TYPES[tp]
    if not _has_type(kind, value):
        return f"must be {_TYPE_WORDS[kind]}"
    if "enum" in meta and value not in meta["enum"]:
        return "allowed one of " + ", ".join(repr(v) for v in meta["enum"])
    low, high = meta.get("minimum"), meta.get("maximum")
    above, below = meta.get("exclusiveMinimum"), meta.get("exclusiveMaximum")
    if not ((low is None or value >= low) and (high is None or value <= high)
            and (above is None or value > above) and (below is None or value < below)):
        if above is not None and below is not None:
            return f"must be in ({above}, {below})"
        bounds = [f">= {low}" if low is not None else None, f"> {above}" if above is not None else None,
                  f"<= {high}" if high is not None else None, f"< {below}" if below is not None else None]
        return "must be " + " and ".join(b for b in bounds if b)
    if "pattern" in meta and not re.search(meta["pattern"], value):
        return f"must match the regular expression {meta['pattern']} ({meta['description']})"
    if "minLength" in meta and len(value) < meta["minLength"]:
        return f"must have at least {meta['minLength']} character(s)"
    return None


def _has_type(kind: str, value: Any) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, {"integer": int, "number": (int, float), "string": str}[kind])


def allowed_words(schema: Mapping[str, Any]) -> str:
    """What a JSON schema accepts, in words: ``an integer from 1 to 100``, ``one of 'a', 'b'``."""
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        return "a mapping with keys " + ", ".join(schema.get("properties", {}))
    if kind == "array":
        text = ("a non-empty list" if schema.get("minItems") else "a list") + (
            " without repeats" if schema.get("uniqueItems") else "")
        return text + (f", each {allowed_words(schema['items'])}" if "items" in schema else "")
    text = _TYPE_WORDS.get(kind, str(kind))
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if "exclusiveMinimum" in schema or "exclusiveMaximum" in schema:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if 'exclusiveMinimum' in schema else '>='} {low}")
        if high is not None:
            bounds.append(f"{'<' if 'exclusiveMaximum' in schema else '<='} {high}")
        text += " " + " and ".join(bounds)
    elif low is not None and high is not None:
        text += f" from {low} to {high}"
    elif low is not None:
        text += f" >= {low}"
    elif high is not None:
        text += f" <= {high}"
    if "pattern" in schema:
        text += f" matching the regular expression {schema['pattern']}"
    if "minLength" in schema:
        text += f" of at least {schema['minLength']} character(s)"
    return text


def _n_m(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4), for a pattern that matches _NM_PATTERN."""
    n, m = pattern.split(":")
    return int(n), int(m)


def _heads_divide(cfg: Any) -> Iterator[Problem]:
    if cfg.hidden_size % cfg.num_heads:
        yield Problem(("hidden_size", "num_heads"), (cfg.hidden_size, cfg.num_heads),
                      "num_heads must divide hidden_size")


def _warmup_below(cfg: Any, *steps: str) -> Iterator[Problem]:
    for name in steps:
        if cfg.warmup_steps >= getattr(cfg, name):
            yield Problem(("warmup_steps", name), (cfg.warmup_steps, getattr(cfg, name)),
                          f"warmup_steps must be below {name}")


# --- the sections ------------------------------------------------------------------------------


@dataclass
class ScenesConfig(Section):
    """Sizes and rendering of the procedural scene dataset."""

    image_size: int = param(48, "Side of the square RGB images, in pixels.", minimum=24, maximum=512)
    num_train: int = param(4000, "Number of training images.", minimum=1, maximum=1000000)
    num_val: int = param(300, "Number of validation images.", minimum=1, maximum=100000)
    num_test: int = param(600, "Number of test images.", minimum=1, maximum=100000)
    num_text_scenes: int = param(
        20000, "Extra text-only scenes (descriptions, questions, captions; no image) for LLM pretraining.",
        minimum=0, maximum=10000000)
    min_objects: int = param(2, "Fewest objects drawn in one scene (must not exceed max_objects).",
                             minimum=1, maximum=NUM_COLORS)
    max_objects: int = param(5, "Most objects drawn in one scene (at least min_objects; one per colour).",
                             minimum=1, maximum=NUM_COLORS)
    questions_per_image: int = param(6, "VQA questions generated per image.", minimum=1, maximum=32)
    noise_std: float = param(12.0, "Standard deviation of the background noise, in grey levels (0-255 scale).",
                             minimum=0, maximum=128)

    def checks(self) -> Iterator[Problem]:
        if self.min_objects > self.max_objects:
            yield Problem(("min_objects", "max_objects"), (self.min_objects, self.max_objects),
                          "min_objects must not exceed max_objects")


@dataclass
class SoundsConfig(Section):
    """Sizes and synthesis of the procedural sound dataset (the embedded default's audio tasks)."""

    sample_rate: int = param(8000, "Samples per second of the clips (the audio encoder's filterbank rate).",
                             minimum=4000, maximum=48000)
    slots: int = param(4, "Time slots of a clip, each silent or holding one note.", minimum=1, maximum=8)
    slot_seconds: float = param(0.3, "Length of a slot, in seconds (a clip lasts slots x slot_seconds).",
                                minimum=0.1, maximum=2.0)
    min_notes: int = param(1, "Fewest notes in one clip (must not exceed max_notes).", minimum=1, maximum=8)
    max_notes: int = param(4, "Most notes in one clip (at most slots).", minimum=1, maximum=8)
    num_train: int = param(2000, "Number of training clips.", minimum=1, maximum=1000000)
    num_val: int = param(200, "Number of validation clips.", minimum=1, maximum=100000)
    num_test: int = param(400, "Number of test clips.", minimum=1, maximum=100000)
    num_text_sounds: int = param(
        1000, "Extra text-only clips (descriptions, questions, captions; no audio) for LLM pretraining.",
        minimum=0, maximum=10000000)
    questions_per_clip: int = param(5, "QA questions generated per clip.", minimum=1, maximum=32)
    noise_std: float = param(0.01, "Standard deviation of the noise floor (full scale is 1).", minimum=0, maximum=0.5)

    def checks(self) -> Iterator[Problem]:
        if self.min_notes > self.max_notes:
            yield Problem(("min_notes", "max_notes"), (self.min_notes, self.max_notes),
                          "min_notes must not exceed max_notes")
        if self.max_notes > self.slots:
            yield Problem(("max_notes", "slots"), (self.max_notes, self.slots), "max_notes must not exceed slots")


@dataclass
class ClipsConfig(Section):
    """Sizes and rendering of the procedural video dataset (the embedded default's video tasks)."""

    frame_size: int = param(32, "Width and height of a frame, in pixels.", minimum=16, maximum=512)
    num_frames: int = param(8, "Frames of a clip (the video encoder reads them all).", minimum=2, maximum=64)
    fps: int = param(8, "Frames per second of the written videos (at most num_frames: the clip lasts a second or "
                     "more, and the feature cache reads all its frames).", minimum=1, maximum=60)
    speed: float = param(2.0, "Pixels a moving object travels per frame (at frame_size 32; scaled with it).",
                         minimum=0.5, maximum=8.0)
    min_objects: int = param(1, "Fewest objects in one clip (must not exceed max_objects).", minimum=1, maximum=6)
    max_objects: int = param(3, "Most objects in one clip (each of its own colour).", minimum=1, maximum=6)
    num_train: int = param(2000, "Number of training clips.", minimum=1, maximum=1000000)
    num_val: int = param(200, "Number of validation clips.", minimum=1, maximum=100000)
    num_test: int = param(400, "Number of test clips.", minimum=1, maximum=100000)
    num_text_clips: int = param(
        1000, "Extra text-only clips (descriptions, questions, captions; no video) for LLM pretraining.",
        minimum=0, maximum=10000000)
    questions_per_clip: int = param(5, "QA questions generated per clip.", minimum=1, maximum=32)
    noise_std: float = param(12.0, "Standard deviation of the background noise (0-255 scale), drawn afresh each "
                             "frame.", minimum=0, maximum=100)

    def checks(self) -> Iterator[Problem]:
        if self.min_objects > self.max_objects:
            yield Problem(("min_objects", "max_objects"), (self.min_objects, self.max_objects),
                          "min_objects must not exceed max_objects")
        if self.fps > self.num_frames:
            yield Problem(("fps", "num_frames"), (self.fps, self.num_frames),
                          "a clip shorter than a second would not give the feature cache every frame: fps must not "
                          "exceed num_frames")
        if self.max_objects > max(1, self.num_frames // 2) + 1:
            yield Problem(("max_objects", "num_frames"), (self.max_objects, self.num_frames),
                          "each object after the first appears at its own frame of the clip's first half: "
                          "max_objects must be at most num_frames // 2 + 1")


@dataclass
class TokenizerConfig(Section):
    vocab_size: int = param(1024, "Vocabulary size, the 256 byte symbols and the special tokens included.",
                            minimum=300, maximum=65536)


@dataclass
class LLMConfig(Section):
    """Architecture and pretraining schedule of the tiny OPT (sections llm and llm_small). Where
    ``sources`` takes the LLM from the hub, the shape keys describe that model (checked against its
    config.json when it is fetched) and the schedule keys are unused."""

    hidden_size: int = param(96, "Width of the residual stream (a multiple of num_heads).", minimum=8, maximum=4096)
    num_layers: int = param(6, "Number of decoder layers.", minimum=1, maximum=64)
    num_heads: int = param(6, "Attention heads per layer (must divide hidden_size).", minimum=1, maximum=64)
    ffn_dim: int = param(192, "Inner width of the feed-forward blocks.", minimum=8, maximum=16384)
    max_positions: int = param(320, "Longest sequence in tokens (prompt, query tokens and answer together).",
                               minimum=16, maximum=8192)
    steps: int = param(3000, "Optimizer steps.", minimum=1, maximum=1000000)
    batch_size: int = param(32, "Sequences per optimizer step.", minimum=1, maximum=4096)
    lr: float = param(0.003, "Peak AdamW learning rate.", exclusiveMinimum=0, maximum=1)
    warmup_steps: int = param(100, "Linear warmup steps (fewer than steps).", minimum=0, maximum=1000000)
    weight_decay: float = param(0.01, "AdamW weight decay.", minimum=0, maximum=1)
    composed_embeddings: bool = param(
        True, "Embed each scene word (largeredcircle, bh) as the sum of its parts' embeddings during pretraining, "
        "so the LLM's input space is linear in object attributes.")
    # Gaussian noise on the description's input embeddings, relative to their RMS (cf. NEFTune,
    # Jain et al. 2023): the LLM learns to read approximate context, as a soft prompt is.
    context_noise: float = param(
        0.5, "Gaussian noise on the description's input embeddings during pretraining, relative to their RMS "
        "(0 turns it off); teaches the LLM to read approximate context such as a soft prompt.",
        minimum=0, maximum=10)

    def checks(self) -> Iterator[Problem]:
        yield from _heads_divide(self)
        yield from _warmup_below(self, "steps")


@dataclass
class EncoderConfig(Section):
    """Architecture and pretraining schedule of the tiny ViT."""

    patch_size: int = param(8, "Side of the square image patches, in pixels.", minimum=1, maximum=64)
    hidden_size: int = param(96, "Width of the encoder (a multiple of num_heads).", minimum=8, maximum=4096)
    num_layers: int = param(3, "Number of transformer layers.", minimum=1, maximum=64)
    num_heads: int = param(4, "Attention heads per layer (must divide hidden_size).", minimum=1, maximum=64)
    mlp_dim: int = param(192, "Inner width of the MLP blocks.", minimum=8, maximum=16384)
    # shape recognition forms late: object-patch shape accuracy 0.76 at 600 steps, 0.94 at 1200
    steps: int = param(1200, "Optimizer steps.", minimum=1, maximum=1000000)
    batch_size: int = param(64, "Images per optimizer step.", minimum=1, maximum=4096)
    lr: float = param(0.002, "Peak AdamW learning rate.", exclusiveMinimum=0, maximum=1)
    warmup_steps: int = param(50, "Linear warmup steps (fewer than steps).", minimum=0, maximum=1000000)

    def checks(self) -> Iterator[Problem]:
        yield from _heads_divide(self)
        yield from _warmup_below(self, "steps")


@dataclass
class VideoEncoderConfig(Section):
    """Architecture and pretraining schedule of the tiny VideoMAE encoder (the embedded default's video encoder): its
    tokens are tubelets, a patch over a few consecutive frames."""

    patch_size: int = param(8, "Patch size in pixels (must divide clips.frame_size).", minimum=2, maximum=64)
    tubelet_size: int = param(2, "Consecutive frames one token covers (must divide clips.num_frames).", minimum=1,
                              maximum=16)
    hidden_size: int = param(64, "Width of the encoder (a multiple of num_heads).", minimum=8, maximum=4096)
    num_layers: int = param(3, "Number of transformer layers.", minimum=1, maximum=64)
    num_heads: int = param(4, "Attention heads per layer (must divide hidden_size).", minimum=1, maximum=64)
    mlp_dim: int = param(128, "Inner width of the MLP blocks.", minimum=8, maximum=16384)
    steps: int = param(1500, "Optimizer steps.", minimum=1, maximum=1000000)
    batch_size: int = param(32, "Clips per optimizer step.", minimum=1, maximum=4096)
    lr: float = param(0.002, "Peak AdamW learning rate.", exclusiveMinimum=0, maximum=1)
    warmup_steps: int = param(50, "Linear warmup steps (fewer than steps).", minimum=0, maximum=1000000)

    def checks(self) -> Iterator[Problem]:
        yield from _heads_divide(self)
        yield from _warmup_below(self, "steps")


@dataclass
class AudioEncoderConfig(Section):
    """Architecture and pretraining schedule of the tiny Audio Spectrogram Transformer (the embedded default's
    audio encoder): its patches span every mel bin, so each token is a stretch of time."""

    num_mel_bins: int = param(16, "Mel bins of the filterbank, and the patches' height.", minimum=4, maximum=256)
    max_length: int = param(128, "Filterbank frames (10 ms each) the encoder reads; longer clips are cut, shorter "
                            "ones padded.", minimum=16, maximum=4096)
    time_stride: int = param(8, "Frames between the starts of consecutive patches (each num_mel_bins frames "
                             "long).", minimum=1, maximum=256)
    hidden_size: int = param(64, "Width of the encoder (a multiple of num_heads).", minimum=8, maximum=4096)
    num_layers: int = param(3, "Number of transformer layers.", minimum=1, maximum=64)
    num_heads: int = param(4, "Attention heads per layer (must divide hidden_size).", minimum=1, maximum=64)
    mlp_dim: int = param(128, "Inner width of the MLP blocks.", minimum=8, maximum=16384)
    steps: int = param(600, "Optimizer steps.", minimum=1, maximum=1000000)
    batch_size: int = param(64, "Clips per optimizer step.", minimum=1, maximum=4096)
    lr: float = param(0.002, "Peak AdamW learning rate.", exclusiveMinimum=0, maximum=1)
    warmup_steps: int = param(50, "Linear warmup steps (fewer than steps).", minimum=0, maximum=1000000)

    def checks(self) -> Iterator[Problem]:
        yield from _heads_divide(self)
        yield from _warmup_below(self, "steps")
        if self.num_mel_bins > self.max_length:
            yield Problem(("num_mel_bins", "max_length"), (self.num_mel_bins, self.max_length),
                          "a patch is num_mel_bins frames long: max_length must be at least num_mel_bins")


@dataclass
class FeaturesConfig(Section):
    batch_size: int = param(128, "Images per encoder forward pass.", minimum=1, maximum=4096)
    shard_size: int = param(2048, "Images per safetensors shard.", minimum=1, maximum=1000000)


@dataclass
class PromptsConfig(Section):
    """Prompt templates shared by LLM pretraining, mapper training and evaluation."""

    vqa_prompt: str = param("Question: {question} Answer:",
                            "VQA prompt template; must contain the placeholder {question}.", pattern=r"\{question\}")
    caption_prompt: str = param("Caption:", "Captioning prompt.", minLength=1)


@dataclass
class StepSharesConfig(Section):
    """Each modality's share of the training steps its tasks' format keys set.

    A task of modality m trains for round(share_m x steps), at least 1: ``mapper.vqa_steps`` and
    ``mapper.caption_steps``, ``train_compressed.finetune_*`` and ``small_*`` (0 there, "the mapper's own", stays 0).
    The embedded clips' and sounds' mappers converge in a fraction of the scenes' steps (README, "What each
    modality costs"). The examples each modality's tasks evaluate: ``example_shares``."""

    image: float = param(1.0, "Share of the image tasks' steps (1: the keys' values).", exclusiveMinimum=0,
                         maximum=10)
    video: float = param(0.25, "Share of the video tasks' steps.", exclusiveMinimum=0, maximum=10)
    audio: float = param(0.4, "Share of the audio tasks' steps.", exclusiveMinimum=0, maximum=10)


@dataclass
class ExampleSharesConfig(Section):
    """Each modality's share of the test examples the skip grid, compression and training with compression
    evaluate per point.

    A task of modality m evaluates round(share_m x n), at least 1, of the n examples its format's key sets
    (``skipping.vqa_questions``, ``skipping.caption_images`` and the same keys of ``compression``; 0, all, stays
    0; ``skipping.grid: full`` evaluates all). The baseline is decoded on the whole split once, so every share
    reads its points' reference from it. The embedded video and audio tasks take 0.5 (README, "What each modality
    costs"): their grids cost as much per example as the scenes'."""

    image: float = param(1.0, "Share of the image tasks' examples (1: the keys' values).", exclusiveMinimum=0,
                         maximum=1)
    video: float = param(0.5, "Share of the video tasks' examples.", exclusiveMinimum=0, maximum=1)
    audio: float = param(0.5, "Share of the audio tasks' examples.", exclusiveMinimum=0, maximum=1)


@dataclass
class MapperTrainConfig(Section):
    """Mapper architecture (paper defaults in comments) and its training schedule."""

    # K (paper: 10); 12 = the description's 6 colour slots x 2 words
    num_query_tokens: int = param(12, "Learned query tokens prepended to the prompt.", minimum=1, maximum=256)
    num_layers: int = param(2, "Transformer layers of the mapper.", minimum=1, maximum=24)  # L (paper: 5)
    hidden_size: int = param(128, "Width of the mapper (a multiple of num_heads).",
                             minimum=8, maximum=4096)  # (paper: 256)
    num_heads: int = param(8, "Attention heads per mapper layer (must divide hidden_size).",
                           minimum=1, maximum=64)  # (paper: 8)
    output: str = param(
        "linear", "How the query outputs become LLM inputs; \"linear\" is the paper's projection to the LLM width, "
        "\"vocab\" a softmax over the LLM vocabulary mixing its token embeddings.", enum=MAPPER_OUTPUTS)
    vqa_steps: int = param(2000, "Optimizer steps of the VQA mapper.", minimum=1, maximum=1000000)
    # captions are longer targets: fewer, slower steps suffice (loss flat after ~400)
    caption_steps: int = param(500, "Optimizer steps of the captioning mapper (longer targets, slower steps).",
                               minimum=1, maximum=1000000)
    batch_size: int = param(64, "Examples per optimizer step.", minimum=1, maximum=4096)
    lr: float = param(0.001, "Peak AdamW learning rate.", exclusiveMinimum=0, maximum=1)
    warmup_steps: int = param(50, "Linear warmup steps (fewer than vqa_steps and caption_steps).",
                              minimum=0, maximum=1000000)
    weight_decay: float = param(0.01, "AdamW weight decay.", minimum=0, maximum=1)
    ffn_dim: int = param(512, "Inner width of each mapper layer's feed-forward network (paper: 512, twice its "
                         "width).", minimum=1, maximum=65536)
    checkpoint_every: int = param(
        200, "Optimizer steps between resumable checkpoints of mapper training (weights, optimizer, LR schedule, "
        "RNG states, losses) under checkpoints/<rule>/<task>; a killed job resumes from the latest and ends with "
        "the same bytes as an uninterrupted run. 0 never checkpoints.", minimum=0, maximum=1000000)

    def checks(self) -> Iterator[Problem]:
        yield from _heads_divide(self)
        yield from _warmup_below(self, "vqa_steps", "caption_steps")


@dataclass
class EvaluationConfig(Section):
    split: str = param("test", "Split that is evaluated.", enum=SPLITS)
    batch_size: int = param(32, "Examples per decoding batch: of this evaluation, of the baseline decode and of "
                            "every family compared with it (the skip grid, compression, training with compression), "
                            "which share the baseline's batches.", minimum=1, maximum=4096)
    vqa_max_new_tokens: int = param(4, "Most tokens generated for one VQA answer.", minimum=1, maximum=64)
    caption_max_new_tokens: int = param(24, "Most tokens generated for one caption.", minimum=1, maximum=256)
    num_beams: int = param(1, "Beams of beam search (1 = greedy decoding).", minimum=1, maximum=16)
    spice: bool = param(False, "Also score captions with SPICE (downloads Stanford CoreNLP, ~400 MB, and needs Java).")


@dataclass
class SkippingConfig(Section):
    """Which skipped variants to evaluate, on how many test examples."""

    grid: str = param("default", "'default' evaluates the lists below; 'full' takes every start layer "
                      "(-1 .. layers - 2) and the whole test split.", enum=GRIDS)
    # every point is compared with the baseline on the same examples (`mmskip baseline`, decoded
    # once per task), which is not a mode
    modes: tuple[str, ...] = param(
        MODES, "Skip modes evaluated (one job per task evaluates them all); each point is compared with the baseline "
        "(stage baseline) on the same examples.", enum=MODES)
    scopes: tuple[str, ...] = param(
        SCOPES, "Tokens a plan applies to (generated tokens, the multimodal context, or both).", enum=SCOPES)
    intervals: tuple[int, ...] = param((2, 3, 4), "Skip every k-th layer (the paper's skip_interval).",
                                       minimum=1, maximum=64)
    start_layers: tuple[int, ...] = param(
        (-1, 1), "Skip layer i only when start_layer < i (the paper's start_layer; -1 includes layer 0).",
        minimum=-1, maximum=255)
    end_layer: int = param(0, "Skip layer i only when i < end_layer; 0 means no bound (all layers).",
                           minimum=0, maximum=256)
    drop_last: tuple[int, ...] = param(
        (1, 2, 3), "Numbers of last blocks removed by the drop_last baseline (each below the LLM's depth).",
        minimum=1, maximum=255)
    semantics: tuple[str, ...] = param(
        SEMANTICS, "What a mode name computes: 'textbook' (the paper's definitions) and/or 'official' (what the "
        "paper's code, mshukor/ima-lmms, computes: README 'Official semantics'). Every grid point is evaluated under "
        "each; the first is the report's headline.", enum=SEMANTICS)
    combine: str = param("mean", "parallel_blocks: 'mean' (the paper's h + (d1 + d2) / 2) or 'sum' (h + d1 + d2); "
                         "textbook semantics only (the official code averages).", enum=COMBINES)
    context_kv: str = param("compute", "Context scope, textbook semantics: keys/values of skipped context positions "
                            "are 'compute'd or taken from the 'previous_layer' (what the paper's code does for "
                            "skip_block).", enum=CONTEXT_KV)
    vqa_questions: int = param(320, "First N test questions evaluated per grid point (0 = all).",
                               minimum=0, maximum=10000000)
    caption_images: int = param(48, "First N test images captioned per grid point (0 = all).",
                                minimum=0, maximum=10000000)


@dataclass
class TokenSkippingConfig(Section):
    """The token-level grid (mmskip evaluate_tokens): tokens leave the computation after a layer, on the skip grid's
    examples (``skipping.vqa_questions``, ``skipping.caption_images``, ``example_shares``), each point compared with
    the baseline on them. Layers are 0-based blocks: "after layer l" means blocks 0..l run every token."""

    kinds: tuple[str, ...] = param(
        TOKEN_KINDS, "Token-level families evaluated (one job per task evaluates them all): visual_exit (the soft "
        "visual tokens leave after a layer, DyVTE), fastv (only the most attended visual tokens stay, FastV), "
        "early_exit (a generated token leaves the upper blocks where the LM head's entropy is low).",
        enum=TOKEN_KINDS)
    visual_exit_layers: tuple[int, ...] = param(
        (1, 3), "visual_exit: the layers after which the visual tokens leave (0 .. llm.num_layers - 2).",
        minimum=0, maximum=255)
    fastv_layers: tuple[int, ...] = param(
        (1,), "fastv: the layers after which visual tokens are pruned (FastV's K=2: after layer 1).",
        minimum=0, maximum=255)
    fastv_keep: tuple[float, ...] = param(
        (0.5, 0.25), "fastv: the fractions of the visual tokens kept (FastV's R=50%: 0.5).", exclusiveMinimum=0,
        maximum=1)
    early_exit_layers: tuple[int, ...] = param(
        (2, 4), "early_exit: the layers whose LM-head entropy decides (0 .. llm.num_layers - 2).", minimum=0,
        maximum=255)
    exit_rates: tuple[float, ...] = param(
        (0.25, 0.5), "early_exit: each threshold is the entropy quantile at this rate over the generated tokens of "
        "the calibration examples (the share of them that would exit).", exclusiveMinimum=0, exclusiveMaximum=1)
    calibration_examples: int = param(
        32, "early_exit: the first N validation examples whose entropies set the thresholds.", minimum=1,
        maximum=100000)


@dataclass
class PruningConfig(Section):
    """Which masks ``mmskip prune`` and ``prune_wanda`` compute (models/masks/{method})."""

    sparsities: tuple[float, ...] = param(
        (0.3, 0.5, 0.7), "Unstructured sparsities (fraction of each row's weights pruned; of each layer's for "
        "magnitude).", exclusiveMinimum=0, exclusiveMaximum=1)
    nm_patterns: tuple[str, ...] = param(
        ("2:4", "4:8"), "N:M patterns: keep N of every M consecutive input weights of a row (e.g. '2:4'), "
        "0 < N < M.", pattern=_NM_PATTERN)
    calibration: str = param(
        "prompt", "Wanda's calibration inputs for the masks at every sparsity: the prompt (soft + text), the prompt "
        "with answers, text only, or only_prompt (soft prompt + BOS: the paper code's).", enum=CALIBRATIONS)
    calibration_modes: tuple[str, ...] = param(CALIBRATIONS, "Calibration modes compared at compare_sparsity.",
                                               enum=CALIBRATIONS)
    compare_sparsity: float = param(0.5, "Sparsity at which the calibration modes are compared.",
                                    exclusiveMinimum=0, exclusiveMaximum=1)
    num_calibration: int = param(
        128, "Training examples (multimodal forward passes through the trained mapper) per calibration.",
        minimum=1, maximum=1000000)
    calibration_batch_size: int = param(32, "Calibration sequences per forward pass.", minimum=1, maximum=4096)

    def checks(self) -> Iterator[Problem]:
        bad = [p for p in self.nm_patterns if not 0 < _n_m(p)[0] < _n_m(p)[1]]
        if bad:
            yield Problem(("nm_patterns",), (self.nm_patterns,),
                          f"each 'N:M' must have 0 < N < M (e.g. '2:4'); {bad} do not")


@dataclass
class SubnetConfig(Section):
    """How ``mmskip subnet`` combines the tasks' Wanda masks into the shared α-SubNet."""

    rules: tuple[str, ...] = param(
        RULES, "α-SubNet rules: keep weights kept by every task (intersection), any (union) or most (majority), "
        "then fit sparsity.", enum=RULES)
    sparsity: float = param(0.5, "Sparsity of the α-SubNet; one of pruning.sparsities (the task masks it "
                            "combines, at pruning.calibration).", exclusiveMinimum=0, exclusiveMaximum=1)


@dataclass
class CompressionConfig(Section):
    """Which mask sets ``mmskip evaluate_compressed`` evaluates, and on how many test examples
    (also the examples ``evaluate_trained`` compares on)."""

    mask_sets: tuple[str, ...] = param(
        MASK_SETS, "Mask sets evaluated (models/masks/{name}; one job per task evaluates them all): the pruning "
        "methods' (magnitude, wanda, random) and the α-SubNet's (subnet, which needs wanda).", enum=MASK_SETS)
    vqa_questions: int = param(320, "First N test questions evaluated per mask (0 = all).",
                               minimum=0, maximum=10000000)
    caption_images: int = param(32, "First N test images captioned per mask (0 = all).", minimum=0, maximum=10000000)

    def checks(self) -> Iterator[Problem]:
        if SUBNET in self.mask_sets and "wanda" not in self.mask_sets:
            yield Problem(("mask_sets",), (self.mask_sets,), f"{SUBNET!r} combines Wanda masks, so needs 'wanda'")


@dataclass
class TrainCompressedConfig(Section):
    """The mapper trained with the compressed LLM (``mmskip train_compressed``, one job per variant and task)."""

    variants: tuple[str, ...] = param(
        TRAIN_VARIANTS, "Mappers trained with compression, one job per variant and task (models/mapper_{variant}): "
        "dense (the control: the same training on the uncompressed LLM), pruned (the Wanda mask), skipped (the skip "
        "plan below), small (the smaller LLM, llm_small, pretrained or fetched only when listed).",
        enum=TRAIN_VARIANTS)
    init: str = param(
        "baseline", "'baseline' fine-tunes the trained mapper for finetune_*_steps; 'scratch' trains anew for "
        "mapper.*_steps (the paper).", enum=TRAIN_INITS)
    finetune_vqa_steps: int = param(200, "Fine-tuning steps of the VQA mapper variants (init baseline).",
                                    minimum=1, maximum=10000000)
    finetune_caption_steps: int = param(100, "Fine-tuning steps of the caption mapper variants (init baseline).",
                                        minimum=1, maximum=10000000)
    sparsity: float = param(
        0.7, "Sparsity of the Wanda mask the pruned variant trains with (one of pruning.sparsities, at "
        "pruning.calibration; 0.7: the paper's claim, findings (4)).", exclusiveMinimum=0, exclusiveMaximum=1)
    interval: int = param(
        2, "The skipped variant trains with skip_block on every k-th layer, all tokens.", minimum=1, maximum=64)
    start_layer: int = param(
        -1, "Start layer of that plan (skip layer i when start < i and i % k == 0; -1 with interval 2: half the "
        "blocks, the paper's claim, findings (4)).", minimum=-1, maximum=255)
    semantics: str = param(
        "textbook", "What the skipped variant's skip_block computes: 'textbook' or 'official' (the paper's code: "
        "never layer 0 nor the last layer).", enum=SEMANTICS)
    # The smaller LLM's mapper trains from scratch (fewer steps than the paper's keep the embedded
    # default in its CPU budget)
    small_vqa_steps: int = param(
        400, "Steps of the smaller LLM's VQA mapper, trained from scratch (0: mapper.vqa_steps, the paper's "
        "setting).", minimum=0, maximum=10000000)
    small_caption_steps: int = param(
        150, "Steps of the smaller LLM's caption mapper, trained from scratch (0: mapper.caption_steps).",
        minimum=0, maximum=10000000)


BENCH_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EngineBenchConfig(Section):
    """Shapes and repeats of ``mmskip bench_engine``: the engine's decode speed on a random model."""

    hidden_size: int = param(768, "Width of the random model (OPT-125m 768).", minimum=8, maximum=16384)
    num_layers: int = param(12, "Blocks of the random model (OPT-125m 12).", minimum=2, maximum=256)
    num_heads: int = param(12, "Attention heads (must divide hidden_size).", minimum=1, maximum=256)
    ffn_dim: int = param(3072, "Feed-forward width (OPT-125m 3072).", minimum=8, maximum=65536)
    vocab_size: int = param(50272, "Vocabulary of the random model (OPT 50272).", minimum=8, maximum=1000000)
    batch_sizes: tuple[int, ...] = param((1, 8, 16, 32), "Batch sizes measured.", minimum=1, maximum=1024)
    context_tokens: int = param(64, "Prompt tokens per row.", minimum=1, maximum=4096)
    # one prefill, at least two decode steps (the growth compares the first and last ones)
    new_tokens: int = param(128, "Tokens generated per row (at least 3).", minimum=3, maximum=4096)
    repeats: int = param(5, "Timed repeats per configuration, interleaved (the fastest is kept; at least 5).",
                         minimum=5, maximum=100)
    interval: int = param(2, "Skip every k-th layer in the benchmarked plans.", minimum=1, maximum=64)
    start_layer: int = param(0, "Skip layer i only when start_layer < i (from -1 to num_layers - 2).",
                             minimum=-1, maximum=255)
    device: str = param("cpu", "Device the random model decodes on (cpu, cuda, cuda:1, ...).", minLength=1)
    dtype: str = param("float32", "dtype of the random model and its cache.", enum=BENCH_DTYPES)
    decodes: tuple[str, ...] = param(
        ("eager",), "How the engine's decode steps run, each measured for the unskipped and the skip_block plan "
        "(eager: every plan; static: fixed shapes; compiled: torch.compile of them; cuda_graph: captured once, "
        "replayed).", enum=DECODES)

    def checks(self) -> Iterator[Problem]:
        yield from _heads_divide(self)
        if "eager" not in self.decodes:
            yield Problem(("decodes",), (list(self.decodes),), "must include 'eager' (every plan's rows and the "
                                                                "CPU bars are the eager engine's)")
        if "cuda_graph" in self.decodes and not self.device.startswith("cuda"):
            yield Problem(("decodes", "device"), (list(self.decodes), self.device),
                          "cuda_graph needs a CUDA device (device: cuda or cuda:N)")
        if self.start_layer > self.num_layers - 2:
            yield Problem(("start_layer", "num_layers"), (self.start_layer, self.num_layers),
                          f"start_layer must be from -1 to {self.num_layers - 2} (num_layers - 2)")
        elif not every_kth_layer(self.num_layers, self.interval, self.start_layer):
            yield Problem(("interval", "start_layer", "num_layers"), (self.interval, self.start_layer, self.num_layers),
                          "the plans must skip at least one layer i (start_layer < i < num_layers, i % interval == 0)")

    def plans(self) -> dict[str, SkipPlan]:
        layers = every_kth_layer(self.num_layers, self.interval, self.start_layer)
        pairs = tuple(i for i in layers if i + 1 < self.num_layers)
        plans = {"none": SkipPlan()}
        for mode in MODES:
            if mode == "drop_last":
                plans[mode] = SkipPlan(mode, scope="all", num_dropped=len(layers))
            else:
                plans[mode] = SkipPlan(mode, pairs if mode == "parallel_blocks" else layers, "generated")
        return plans


@dataclass
class BenchConfig(EngineBenchConfig):
    """``mmskip bench_skip`` (the pipeline stage): the engine benchmark at the report's shapes, and
    batched vs batch-1 evaluation of the default model."""

    batch_sizes: tuple[int, ...] = param((1, 8), "Batch sizes measured.", minimum=1, maximum=1024)
    new_tokens: int = param(16, "Tokens generated per row (at least 3).", minimum=3, maximum=4096)
    eval_examples: int = param(128, "Test examples per task decoded at batch 1 and batched.",
                               minimum=1, maximum=100000)
    eval_batch_size: int = param(16, "The batched side of the batch-1 comparison.", minimum=2, maximum=4096)


@dataclass
class PruneBenchConfig(Section):
    num_sequences: int = param(128, "Calibration sequences.", minimum=1, maximum=100000)
    sequence_length: int = param(128, "Tokens per calibration sequence.", minimum=1, maximum=8192)
    batch_size: int = param(16, "Sequences per forward pass.", minimum=1, maximum=4096)
    sparsity: float = param(0.5, "Unstructured Wanda sparsity.", exclusiveMinimum=0, exclusiveMaximum=1)
    hidden_size: int = param(768, "Width of the random model.", minimum=1, maximum=65536)
    num_layers: int = param(12, "Depth of the random model.", minimum=1, maximum=256)
    num_heads: int = param(12, "Attention heads of the random model (must divide hidden_size).",
                           minimum=1, maximum=256)
    ffn_dim: int = param(3072, "FFN width of the random model.", minimum=1, maximum=262144)
    vocab_size: int = param(50272, "Vocabulary of the random model.", minimum=1, maximum=1000000)

    def checks(self) -> Iterator[Problem]:
        yield from _heads_divide(self)


@dataclass
class ReportConfig(Section):
    num_qualitative: int = param(8, "Example images with predictions shown per task and variant.",
                                 minimum=0, maximum=100)


# --- the whole of params.yaml ------------------------------------------------------------------

# Rules across sections: (the sections a rule reads, the rule). A rule yields Problems whose keys
# are dotted from the top of params.yaml.
_ACROSS: list[tuple[tuple[str, ...], Callable[..., Iterator[Problem]]]] = []


def across(*sections: str):
    """Register a rule that reads ``sections`` (fields of ``Params``: sections, or top-level keys such as
    ``tasks``; passed in this order), run once each of them is fine on its own."""
    def register(rule):
        _ACROSS.append((sections, rule))
        return rule
    return register


@dataclass
class RuntimeConfig(Section):
    """Where the stages that run the LLM or the encoder run, and in which dtype."""

    device: str = param("cpu", "Device of the stages that run the LLM or the encoder: feature caching, mapper "
                        "training, every decode, Wanda's calibration (cpu, cuda, cuda:N). The embedded default's own "
                        "pretraining (pretrain_llm, pretrain_encoder) stays on the CPU. On SLURM, each of those "
                        "stages asks for one GPU when this is cuda.", pattern=r"^(cpu|cuda(:[0-9]+)?)$")
    dtype: str = param("float32", "dtype of the frozen LLM and encoder in those stages, and of the cached "
                       "features. The mappers are trained and kept in float32, their prompts cast to the LLM's "
                       "dtype.", enum=BENCH_DTYPES)


DATASETS = ("scenes", "coco")
# the keys of an LLM section that describe its shape: checked against a hub model's config.json
LLM_SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "ffn_dim", "max_positions")
# the foundation models the pipeline builds, or a hub id replaces
HUB_MODELS = ("llm", "llm_small", "encoder", "video_encoder", "audio_encoder")
# the encoder of each modality: its sources key, and its folder models/{key}; the pipeline pretrains the image
# encoder (on the scenes), the video encoder (on the clips) and the audio encoder (on the sounds)
ENCODERS = {"image": "encoder", "video": "video_encoder", "audio": "audio_encoder"}
LLAVA = "llava"  # sources.llava: LLaVA-1.5 evaluated without training, in place of the trained pipeline
_HUB_ID = r"^$|^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"  # "" or organisation/name


@dataclass
class SourcesConfig(Section):
    """Where the data and the foundation models come from: built by the pipeline (the embedded default)
    or fetched from their publishers (paper scale, configs/paper/*.yaml)."""

    data: str = param("scenes", "The dataset: 'scenes' are generated by the pipeline (make_scenes); 'coco' is COCO "
                      "2014 with Karpathy's split and VQAv2 (captioning and VQA), downloaded by fetch_data and "
                      "converted by prepare_coco (needs hub ids for llm, llm_small and encoder).", enum=DATASETS)
    llm: str = param("", "Hub id of the frozen LLM (facebook/opt-2.7b); '' pretrains it here (section llm, which "
                     "must then describe the hub model's shape: checked when it is fetched).", pattern=_HUB_ID)
    llm_revision: str = param("main", "Revision of sources.llm: pin the commit fetch_model prints.", minLength=1)
    llm_small: str = param("", "Hub id of the smaller LLM of 'train with a smaller LLM' (facebook/opt-1.3b); '' "
                           "pretrains it here (section llm_small).", pattern=_HUB_ID)
    llm_small_revision: str = param("main", "Revision of sources.llm_small.", minLength=1)
    encoder: str = param("", "Hub id of the frozen encoder (openai/clip-vit-large-patch14); '' pretrains it here "
                         "(section encoder, on the scenes).", pattern=_HUB_ID)
    encoder_revision: str = param("main", "Revision of sources.encoder.", minLength=1)
    video_encoder: str = param("", "Hub id of the frozen video encoder of the video tasks (msrvtt), a TimeSformer "
                               "(facebook/timesformer-base-finetuned-k600): its config's num_frames frames of each "
                               "clip, one a second, through its image processor. Needed by a video task, unused "
                               "otherwise.", pattern=_HUB_ID)
    video_encoder_revision: str = param("main", "Revision of sources.video_encoder.", minLength=1)
    msrvtt_split: str = param("full", "MSR-VTT's split (the msrvtt task's prepare_msrvtt stage): 'full' is "
                              "MSR-VTT's own captioning split (6513 / 497 / 2990 videos), 'jsfusion' trains on "
                              "JSFusion's 9000 videos and tests on its 1000 (1k-A), with no val.",
                              enum=("full", "jsfusion"))
    audio_encoder: str = param("", "Hub id of the frozen audio encoder of the audio tasks (clotho), an Audio "
                               "Spectrogram Transformer (MIT/ast-finetuned-audioset-10-10-0.4593): its feature "
                               "extractor's filterbank of each clip resampled to its sampling rate. Needed by an "
                               "audio task, unused otherwise.", pattern=_HUB_ID)
    audio_encoder_revision: str = param("main", "Revision of sources.audio_encoder.", minLength=1)
    msrvtt_qa: str = param("", "The folder that holds your MSRVTT-QA files, train_qa.json, val_qa.json and "
                           "test_qa.json (its publishers give no stable download), read by the msrvtt_qa task's "
                           "prepare_msrvtt_qa stage on MSR-VTT's videos. '': no MSRVTT-QA.")
    audiocaps_audio: str = param("", "The folder that holds your AudioCaps clips, of every split (AudioCaps is on "
                                 "YouTube only: no stage downloads its clips); read by the audiocaps task's "
                                 "prepare_audiocaps stage, which lists the clips it lacks. '': no AudioCaps.")
    audiocaps_clip_name: str = param("{youtube_id}.wav", "The file name of an AudioCaps clip in "
                                     "sources.audiocaps_audio, over its CSV's columns: {youtube_id}, and "
                                     "{start_time} or {audiocap_id} where your files use them (Y{youtube_id}.wav, "
                                     "{youtube_id}_{start_time}.wav).", minLength=1)
    llava: str = param("", "Hub id of a LLaVA-1.5 checkpoint (llava-hf/llava-1.5-7b-hf) evaluated without training: "
                       "the pipeline is then the data, this model, its skip grid per task (evaluate_llava) and the "
                       "report; section llm must describe its language model (checked when it is fetched), and "
                       "sources.llm, llm_small and encoder stay empty. '' runs the trained pipeline.",
                       pattern=_HUB_ID)
    llava_revision: str = param("main", "Revision of sources.llava.", minLength=1)
    hub_cache: str = param("models/hub", "Hugging Face cache the fetch_model stage fills (on the host Snakemake "
                           "runs on: a login node with network) and every job reads offline.", minLength=1)
    mirror: str = param("", "http(s)://host[:port] that replaces every source's host (a site mirror); '' downloads "
                        "from the publishers.", pattern=r"^$|^https?://[^/\s]+/?$")
    catalog: str = param("", "A YAML file of {name: {url, md5}} whose entries replace the built-in sources of those "
                         "names (a site's own copies, repackaged); '' uses the built-in ones.")

    def checks(self) -> Iterator[Problem]:
        from mmskip.data.audiocaps import check_clip_name

        try:
            check_clip_name(self.audiocaps_clip_name)
        except ValueError as err:
            yield Problem(("audiocaps_clip_name",), (self.audiocaps_clip_name,), str(err).split(": ", 1)[1])
        if self.llava:
            used = [m for m in HUB_MODELS if getattr(self, m)]
            if used:
                yield Problem(("llava", *used), (self.llava, *(getattr(self, m) for m in used)),
                              f"sources.llava runs {self.llava} alone, without training: sources "
                              f"{', '.join(used)} would be unused; leave them '' (the trained setups have their own "
                              "configs)")


@dataclass
class Params(Section):
    """params.yaml: the seed, and one dataclass per section (``SECTIONS``)."""

    seed: int = param(0, "Random seed passed as --seed to every stage that samples (scenes, training).",
                      minimum=0, maximum=4294967295)
    seeds: tuple[int, ...] = param(
        (0,), "Seeds of the mappers' training, the first `seed` (the mappers every family reads). Each other seed "
        "trains every task's mapper again with it (models/mapper_seeds/{seed}/{task}) and decodes its baseline "
        "(results/seeds/{seed}/{task}): the report gives each task's spread over the seeds and the findings judge "
        "their margins against it. One seed (the default): the spread is not measured, and the report says so. "
        "The stages are made from this list: after changing it, regenerate dvc.yaml (make generate).",
        minimum=0, maximum=4294967295)
    tasks: tuple[str, ...] = param(
        ("vqa", "caption", "video_qa", "video_caption", "audio_qa", "audio_caption"),
        "The tasks the pipeline runs, by their names in the task registry (mmskip.tasks): one "
        "mapper, evaluation, baseline, skip grid, compression and training family each; Wanda calibrates on, and the "
        "α-SubNet combines, exactly these. The embedded default runs two tasks per modality: vqa and caption on the "
        "scenes, video_qa and video_caption on the generated clips, audio_qa and audio_caption on the generated "
        "sounds (configs/embedded/image.yaml: the image tasks alone); okvqa, gqa, msrvtt, msrvtt_qa (video), clotho, "
        "clotho_aqa and audiocaps (audio) read datasets of their own, at paper scale (sources.data: coco). "
        "The stages are made from this list: after "
        "changing it, regenerate dvc.yaml (make generate, or mmskip use_config).", pattern=r"^[a-z][a-z0-9_]*$")
    runtime: RuntimeConfig = section(RuntimeConfig, "Device and dtype of the torch stages (the embedded default: "
                                     "cpu, float32).")
    sources: SourcesConfig = section(SourcesConfig, "Where the data and the foundation models come from (the "
                                     "embedded default builds them; paper scale fetches them).")
    data: ScenesConfig = section(ScenesConfig, "Procedural scenes (mmskip make_scenes).")
    clips: ClipsConfig = section(ClipsConfig, "Procedural video clips (mmskip make_clips), read by the embedded "
                                 "video tasks (video_qa, video_caption) alone.")
    sounds: SoundsConfig = section(SoundsConfig, "Procedural sounds (mmskip make_sounds), read by the embedded "
                                   "audio tasks (audio_qa, audio_caption) alone.")
    tokenizer: TokenizerConfig = section(TokenizerConfig, "Tokenizer trained on the scene texts "
                                         "(mmskip train_tokenizer).")
    llm: LLMConfig = section(LLMConfig, "Small OPT language model pretrained on scene texts (mmskip pretrain_llm).")
    # the smaller LLM of "train with a smaller LLM" (compression): about half the depth and width
    llm_small: LLMConfig = section(
        LLMConfig, "The smaller LLM (same keys as llm), pretrained for the \"train with a smaller LLM\" variant.",
        hidden_size=48, num_layers=3, num_heads=3, ffn_dim=96, steps=400)
    encoder: EncoderConfig = section(EncoderConfig, "Small ViT image encoder pretrained on the scenes "
                                     "(mmskip pretrain_encoder).")
    video_encoder: VideoEncoderConfig = section(VideoEncoderConfig, "Small VideoMAE encoder pretrained on the clips "
                                                "(mmskip pretrain_video_encoder), for the video tasks where "
                                                "sources.video_encoder is ''.")
    audio_encoder: AudioEncoderConfig = section(AudioEncoderConfig, "Small Audio Spectrogram Transformer "
                                                "pretrained on the sounds (mmskip pretrain_audio_encoder), for the "
                                                "audio tasks where sources.audio_encoder is ''.")
    features: FeaturesConfig = section(FeaturesConfig, "Frozen encoder features cached to safetensors shards "
                                       "(mmskip cache_features).")
    prompts: PromptsConfig = section(PromptsConfig, "Text prompts shared by mapper training and evaluation.")
    step_shares: StepSharesConfig = section(
        StepSharesConfig, "Each modality's share of its tasks' training steps (mapper, train_compressed): the video "
        "and audio mappers converge in a fraction of the image mappers' steps.")
    example_shares: ExampleSharesConfig = section(
        ExampleSharesConfig, "Each modality's share of the test examples the skip grid, compression and training "
        "with compression evaluate (skipping, compression).")
    mapper: MapperTrainConfig = section(MapperTrainConfig, "Perceptual mapper from image features to LLM inputs "
                                        "(mmskip train_mapper).")
    evaluation: EvaluationConfig = section(
        EvaluationConfig, "Generation and scoring: the whole split through Hugging Face generate (mmskip evaluate), "
        "and the baseline decoded once per task through the skip engine (mmskip baseline), which every family "
        "below is compared with.")
    skipping: SkippingConfig = section(
        SkippingConfig, "The skip grid (mmskip evaluate_skip): every point is a skip plan applied to the trained "
        "mappers and cached features, scored against the baseline on the same examples.")
    token_skipping: TokenSkippingConfig = section(
        TokenSkippingConfig, "The token-level grid (mmskip evaluate_tokens): visual tokens leave or are pruned after "
        "a layer, generated tokens exit early, on the skip grid's examples, each point against the baseline.")
    pruning: PruningConfig = section(
        PruningConfig, "Pruning of the frozen LLM (mmskip prune, prune_wanda): every mask computed once under "
        "models/masks/{method} (a mask set per pruning method).")
    subnet: SubnetConfig = section(SubnetConfig, "The α-SubNet (mmskip subnet): one mask shared by the tasks, from "
                                   "their Wanda masks.")
    compression: CompressionConfig = section(
        CompressionConfig, "Evaluation of the compressed LLMs (mmskip evaluate_compressed): every mask of each "
        "mask set against the baseline (the dense LLM) on the same first test examples (also those of evaluate_trained).")
    train_compressed: TrainCompressedConfig = section(
        TrainCompressedConfig, "The mapper trained with the compressed LLM (mmskip train_compressed: variants "
        "dense, pruned, skipped, small), compared with inference-only compression by evaluate_trained.")
    bench: BenchConfig = section(
        BenchConfig, "mmskip bench_skip: decode speed of every skip mode on a random OPT-125m-shaped model, and "
        "batched vs batch-1 evaluation of the default model (results/bench/skip.json).")
    bench_engine: EngineBenchConfig = section(
        EngineBenchConfig, "mmskip bench_engine (a command, not a pipeline stage): the skip engine's decode speed "
        "on a random model of this shape at every batch size, against model.generate and each mode's FLOP-ideal "
        "speedup, and the growth of step time with length (results/bench/engine.json).")
    bench_prune: PruneBenchConfig = section(
        PruneBenchConfig, "mmskip bench_prune (a command, not a pipeline stage): Wanda's time and peak memory on "
        "the default LLM and on a random model of this shape, with this calibration.")
    report: ReportConfig = section(ReportConfig, "HTML report and summary table (mmskip report).")

    def checks(self) -> Iterator[Problem]:
        for sections, rule in _ACROSS:
            yield from rule(*(getattr(self, s) for s in sections))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Params:
        """Params from a mapping such as params.yaml's (absent keys take their defaults); raises
        ``ParamsError`` with every problem, keys dotted."""
        problems = params_problems(values)
        if problems:
            raise ParamsError(problems)
        return cls(**{name: SECTIONS[name](**values[name]) if name in SECTIONS else values[name]
                      for name in values})


@across("seed", "seeds")
def _seeds_start_with_the_seed(seed: int, seeds: Sequence[int]) -> Iterator[Problem]:
    """The first of ``seeds`` is the run's own ``seed``: its mappers are the ones every family reads."""
    if seeds[0] != seed:
        yield Problem(("seeds", "seed"), (list(seeds), seed), f"the first seed must be seed ({seed}): its mappers are "
                      "the run's; the others train replicas")


@across("tasks")
def _unregistered(tasks: Sequence[str]) -> list[Problem]:
    """``tasks`` (params ``tasks``) that the task registry lacks, as one problem naming the registered ones."""
    from mmskip.tasks import TASKS  # the registry (torch-free): a task registered there counts

    unknown = [t for t in tasks if t not in TASKS]
    if not unknown:
        return []
    return [Problem(("tasks",), (list(tasks),), f"{', '.join(map(repr, unknown))} not registered; allowed a "
                    f"non-empty subset of {sorted(TASKS)} without repeats (mmskip.tasks registry)")]


@across("tasks", "sources")
def _own_dataset_at_paper_scale(tasks: Sequence[str], sources: SourcesConfig) -> list[Problem]:
    """A task with a dataset of its own reads what paper scale downloads (OK-VQA, GQA, MSR-VTT, Clotho, AudioCaps),
    or what the embedded default generates beside the scenes (the sounds of audio_qa and audio_caption): each on
    its own side."""
    from mmskip.tasks import GENERATED_DATASETS, TASKS

    own = [t for t in tasks if t in TASKS and TASKS[t].dataset]
    downloaded = [t for t in own if TASKS[t].dataset not in GENERATED_DATASETS]
    generated = [t for t in own if TASKS[t].dataset in GENERATED_DATASETS]
    if downloaded and sources.data == "scenes":
        return [Problem(("tasks", "sources.data"), (list(tasks), sources.data),
                        f"{', '.join(f'{t!r} reads dataset {TASKS[t].dataset!r}' for t in downloaded)}, which paper "
                        f"scale downloads (sources.data: coco); the embedded default has the tasks "
                        f"{[t for t, task in TASKS.items() if task.dataset in ('', *GENERATED_DATASETS)]}")]
    if generated and sources.data != "scenes":
        return [Problem(("tasks", "sources.data"), (list(tasks), sources.data),
                        f"{', '.join(f'{t!r} reads the generated {TASKS[t].dataset!r}' for t in generated)}, which the "
                        f"embedded default makes (sources.data: scenes); at paper scale the tasks are "
                        f"{[t for t, task in TASKS.items() if task.dataset not in GENERATED_DATASETS]}")]
    return []


def modalities(tasks: Sequence[str]) -> list[str]:
    """The modalities of the registered ``tasks``, in ENCODERS' order (unregistered ones: see ``_unregistered``)."""
    from mmskip.tasks import TASKS

    have = {TASKS[t].modality for t in tasks if t in TASKS}
    return [m for m in ENCODERS if m in have]


@across("tasks", "sources")
def _hub_models_the_tasks_need(tasks: Sequence[str], sources: SourcesConfig) -> list[Problem]:
    """Away from the scenes, the LLMs and the encoder of each modality the tasks have come from the hub (the
    pipeline pretrains its own models only on the embedded default's generated data); LLaVA sees images alone."""
    from mmskip.tasks import TASKS

    have = modalities(tasks)
    encoders = [ENCODERS[m] for m in have]
    if sources.llava:
        other = [m for m in have if m != "image"]
        if not other:
            return []
        return [Problem(("tasks", "sources.llava"), (list(tasks), sources.llava),
                        f"sources.llava sees images alone: the {', '.join(other)} tasks "
                        f"{[t for t in tasks if t in TASKS and TASKS[t].modality in other]} need the trained "
                        "pipeline")]
    if sources.data == "scenes":  # the LLMs and every modality's encoder are pretrained here
        return []
    missing = [m for m in ("llm", "llm_small", *encoders) if not getattr(sources, m)]
    if not missing:
        return []
    return [Problem(tuple(f"sources.{k}" for k in ("data", *missing)),
                    (sources.data, *(getattr(sources, m) for m in missing)),
                    f"sources.data {sources.data!r} needs a hub id for {', '.join(missing)} (the pipeline pretrains "
                    f"its own models only on the scenes); tasks {list(tasks)} are {', '.join(have)}")]


@across("tasks", "sources")
def _users_media(tasks: Sequence[str], sources: SourcesConfig) -> list[Problem]:
    """A task whose files no stage downloads (AudioCaps' clips: YouTube only; MSRVTT-QA's questions) reads the
    user's folder, the sources key its registry entry names (``Task.user_media``)."""
    from mmskip.tasks import TASKS

    return [Problem(("tasks", f"sources.{key}"), (list(tasks), ""),
                    f"the {task} task reads your own folder (no stage downloads what it holds): give it")
            for task in tasks if task in TASKS and (key := TASKS[task].user_media) and not getattr(sources, key)]


@across("tasks", "compression", "sources")
def _one_task_subnet(tasks: Sequence[str], compression: CompressionConfig, sources: SourcesConfig) -> list[Problem]:
    """The α-SubNet combines the Wanda masks of two tasks or more: one task has none to evaluate (LLaVA's
    pipeline, which compresses nothing, aside)."""
    if len(tasks) > 1 or SUBNET not in compression.mask_sets or sources.llava:
        return []
    return [Problem(("tasks", "compression.mask_sets"), (list(tasks), list(compression.mask_sets)),
                    f"the α-SubNet combines the Wanda masks of two tasks or more: with one task, leave "
                    f"{SUBNET!r} out of compression.mask_sets")]


def merged(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``overlay`` over ``base`` as Snakemake merges ``--configfile`` over params.yaml: mappings key by key,
    every other value replaced whole."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merged(base[key], value) if isinstance(value, Mapping) and isinstance(base.get(key), Mapping) \
            else value
    return out


def _flow(value: Any) -> Any:
    """A list as params.yaml writes lists, ``[a, b]``."""
    if not isinstance(value, list):
        return value
    from ruamel.yaml.comments import CommentedSeq

    seq = CommentedSeq(value)
    seq.fa.set_flow_style()
    return seq


def read_config(path: str | Path) -> Mapping[str, Any]:
    """A config file (configs/paper/*.yaml): a mapping of params.yaml sections."""
    import yaml

    overlay = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(overlay, Mapping):
        raise ValueError(f"{path}: a config is a mapping of params.yaml sections, got {type(overlay).__name__}")
    return overlay


def load_params(params_path: str | Path, configs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """``params_path`` with ``configs`` merged over it in order, as Snakemake merges ``--configfile``;
    checked (``ParamsError`` with every problem)."""
    import yaml

    params = yaml.safe_load(Path(params_path).read_text(encoding="utf-8"))
    for config in configs:
        params = merged(params, read_config(config))
    problems = params_problems(params)
    if problems:
        raise ParamsError(problems)
    return params


def use_config(overlay: Mapping[str, Any], params_path: str | Path = "params.yaml") -> int:
    """Write ``overlay`` (a config :func:`load_params` has checked over ``params_path``) into ``params_path``
    (what ``snakemake --configfile`` runs, for DVC), keeping the file's comments and layout. Returns how
    many values changed."""
    from ruamel.yaml import YAML

    from mmskip.io import atomic_path

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    document = rt.load(Path(params_path).read_text(encoding="utf-8"))
    changed = 0

    def update(target: Any, values: Mapping[str, Any]) -> None:
        nonlocal changed
        for key, value in values.items():
            if isinstance(value, Mapping) and isinstance(target.get(key), Mapping):
                update(target[key], value)
            elif target.get(key) != value:
                target[key] = _flow(value)
                changed += 1

    update(document, overlay)
    with atomic_path(params_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        rt.dump(document, f)
    return changed


# Keys renamed in an earlier version: an old params file is refused with the new name.
RENAMED = {"compression.methods": "compression.mask_sets", "train_compressed.skip_interval": "train_compressed.interval",
           "train_compressed.skip_start_layer": "train_compressed.start_layer"}


def renamed_hint(dotted: str) -> str:
    """`` (renamed: <new key>)`` for a key an earlier version used, else ``""``."""
    return f" (renamed: {RENAMED[dotted]})" if dotted in RENAMED else ""


# params.yaml section -> its dataclass (llm and llm_small share LLMConfig)
SECTIONS: dict[str, type] = {f.name: _hints(Params)[f.name] for f in dataclasses.fields(Params)
                             if _is_section(_hints(Params)[f.name])}


def params_problems(values: Mapping[str, Any], skip: Collection[str] = ()) -> list[Problem]:
    """Every problem of a params mapping, keys dotted from its top: unknown keys, values a key
    does not allow, and the rules within and across sections (each across-rule once the sections
    it reads are fine). ``skip`` names top-level keys already reported (by the JSON schema), which
    are neither read nor checked."""
    names = [f.name for f in dataclasses.fields(Params)]
    problems = [Problem((key,), (value,), "unknown key; allowed: " + ", ".join(names))
                for key, value in values.items() if key not in names and key not in skip]
    problems += _key_problems(Params, {k: v for k, v in values.items() if k not in skip})
    refused = {p.keys[0] for p in problems}
    # the top-level keys each fine alone, as the dataclass holds them (lists as tuples), for the rules across
    built: dict[str, Any] = {f.name: tuple(values[f.name]) if isinstance(values[f.name], list) else values[f.name]
                             for f in dataclasses.fields(Params) if f.name in values and f.name not in SECTIONS
                             and f.name not in skip and f.name not in refused}
    for name, cls in SECTIONS.items():
        if name in skip:
            continue
        given = values.get(name, {})
        if not isinstance(given, Mapping):
            problems.append(Problem((name,), (given,), f"must be {allowed_words(_object_schema(cls, cls()))}"))
            continue
        keys = [f.name for f in dataclasses.fields(cls)]
        unknown = [Problem((f"{name}.{k}",), (v,), f"unknown key{renamed_hint(f'{name}.{k}')}; allowed: "
                           + ", ".join(keys))
                   for k, v in given.items() if k not in keys]
        if unknown:
            problems += unknown
            continue
        try:
            built[name] = cls(**given)
        except ParamsError as err:
            problems += [p.within(name) for p in err.problems]
    for sections, rule in _ACROSS:
        if all(s in built for s in sections):
            problems += rule(*(built[s] for s in sections))
    return problems


# --- rules across sections ---------------------------------------------------------------------

@across("skipping", "llm")
def _skip_grid_fits_the_llm(skipping: SkippingConfig, llm: LLMConfig) -> Iterator[Problem]:
    """The grid's layers exist in the LLM it runs on (mmskip.skipping.grid.grid_points)."""
    n = llm.num_layers
    if skipping.grid == "default" and set(skipping.modes) - {"drop_last"}:
        bad = [s for s in skipping.start_layers if s > n - 2]
        if bad:
            yield Problem(("skipping.start_layers", "llm.num_layers"), (skipping.start_layers, n),
                          f"each start layer must be from -1 to {n - 2} (llm.num_layers - 2); {bad} leave no "
                          "layer to skip")
    if "drop_last" in skipping.modes:
        bad = [k for k in skipping.drop_last if k >= n]
        if bad:
            yield Problem(("skipping.drop_last", "llm.num_layers"), (skipping.drop_last, n),
                          f"each must be from 1 to {n - 1} (below llm.num_layers); {bad} drop every layer")
    if skipping.end_layer > n:
        yield Problem(("skipping.end_layer", "llm.num_layers"), (skipping.end_layer, n),
                      f"must be from 0 to {n} (llm.num_layers; 0: no bound)")


@across("token_skipping", "llm", "sources")
def _token_layers_fit_the_llm(tokens: TokenSkippingConfig, llm: LLMConfig, sources) -> Iterator[Problem]:
    """Tokens leave after a layer below the last (mmskip.evaluation.evaluate_tokens.token_points); LLaVA's run
    (sources.llava) has no token grid."""
    if sources.llava:
        return
    n = llm.num_layers
    for kind, key in (("visual_exit", "visual_exit_layers"), ("fastv", "fastv_layers"),
                      ("early_exit", "early_exit_layers")):
        bad = [layer for layer in getattr(tokens, key) if layer > n - 2]
        if kind in tokens.kinds and bad:
            yield Problem((f"token_skipping.{key}", "llm.num_layers"), (getattr(tokens, key), n),
                          f"each layer must be from 0 to {n - 2} (llm.num_layers - 2); {bad} leave no block after")


@across("train_compressed", "llm")
def _skipped_training_skips_a_layer(train: TrainCompressedConfig, llm: LLMConfig) -> Iterator[Problem]:
    """The skipped variant's plan skips a layer (compression.train.train_skip_plan)."""
    if "skipped" not in train.variants:
        return
    n, start, interval = llm.num_layers, train.start_layer, train.interval
    select = official_layers if train.semantics == "official" else every_kth_layer
    if start >= n or not select(n, interval, start, None):
        bound = "0 < i < llm.num_layers - 1" if train.semantics == "official" else "i < llm.num_layers"
        yield Problem(("train_compressed.interval", "train_compressed.start_layer", "llm.num_layers"),
                      (interval, start, n), "the skipped mapper's plan must skip at least one layer i of the LLM "
                      f"(start_layer < i, {bound}, i % interval == 0)")


@across("pruning", "llm")
def _patterns_tile_the_llm(pruning: PruningConfig, llm: LLMConfig) -> Iterator[Problem]:
    """Every N:M pattern tiles the input width of every pruned linear layer (pruning.mask_from_scores)."""
    bad = [p for p in pruning.nm_patterns if llm.hidden_size % _n_m(p)[1] or llm.ffn_dim % _n_m(p)[1]]
    if bad:
        yield Problem(("pruning.nm_patterns", "llm.hidden_size", "llm.ffn_dim"),
                      (pruning.nm_patterns, llm.hidden_size, llm.ffn_dim),
                      f"M of each 'N:M' must divide llm.hidden_size and llm.ffn_dim (the input widths of the "
                      f"pruned layers); {bad} do not")


@across("subnet", "train_compressed", "pruning")
def _masks_that_exist(subnet: SubnetConfig, train: TrainCompressedConfig, pruning: PruningConfig) -> Iterator[Problem]:
    """The α-SubNet and the pruned variant read the Wanda masks of one of pruning.sparsities."""
    for key, value, why in (("subnet.sparsity", subnet.sparsity, "the task masks it combines"),
                            *((("train_compressed.sparsity", train.sparsity,
                                "training uses the mask the inference-only evaluation uses"),)
                              if "pruned" in train.variants else ())):
        if value not in pruning.sparsities:
            yield Problem((key, "pruning.sparsities"), (value, pruning.sparsities),
                          f"{key} must be one of pruning.sparsities ({why})")


@across("mapper", "train_compressed")
def _warmup_fits_compressed_training(mapper: MapperTrainConfig, train: TrainCompressedConfig) -> Iterator[Problem]:
    """Training with compression replaces the mapper's steps (compression.train.train_compressed)."""
    for key in _compressed_step_keys(train):
        steps = getattr(train, key)
        if mapper.warmup_steps >= steps:
            yield Problem(("mapper.warmup_steps", f"train_compressed.{key}"), (mapper.warmup_steps, steps),
                          f"mapper.warmup_steps must be below train_compressed.{key} (the steps of that training)")


def _compressed_step_keys(train: TrainCompressedConfig) -> list[str]:
    """The train_compressed keys that set the steps of a training of ``variants`` (0 for small_*: the mapper's own)."""
    keys = [k for k in ("small_vqa_steps", "small_caption_steps") if getattr(train, k)] \
        if "small" in train.variants else []
    fine_tuned = train.init == "baseline" and set(train.variants) - {"small"}
    return ["finetune_vqa_steps", "finetune_caption_steps", *keys] if fine_tuned else keys


@across("tasks", "mapper", "train_compressed", "step_shares")
def _warmup_fits_each_modalitys_share(tasks: Sequence[str], mapper: MapperTrainConfig, train: TrainCompressedConfig,
                                      shares: StepSharesConfig) -> Iterator[Problem]:
    """A modality's mappers train for its share of the steps, warmed up for its share of mapper.warmup_steps
    (mmskip.mapper.train): rounding must leave the warmup below every training's steps."""
    from mmskip.tasks import scaled

    for modality in modalities(tasks):
        share = getattr(shares, modality)
        warmup = scaled(mapper.warmup_steps, share)
        for section, cfg, keys in (("mapper", mapper, ("vqa_steps", "caption_steps")),
                                   ("train_compressed", train, _compressed_step_keys(train))):
            for key in keys:
                value = getattr(cfg, key)
                steps = scaled(value, share)
                # below the unscaled steps (the checks above name that) but not once rounded
                if mapper.warmup_steps < value and warmup >= steps:
                    yield Problem(("mapper.warmup_steps", f"{section}.{key}", f"step_shares.{modality}"),
                                  (mapper.warmup_steps, value, share),
                                  f"the {modality} tasks train {steps} steps with {warmup} of warmup (each "
                                  f"round(share x value)): raise {section}.{key} or step_shares.{modality}")


@across("mapper", "evaluation", "llm", "llm_small")
def _soft_prompt_fits_the_llms(mapper: MapperTrainConfig, evaluation: EvaluationConfig, llm: LLMConfig,
                               llm_small: LLMConfig) -> Iterator[Problem]:
    """Query tokens, at least one prompt token and the generated tokens fit the LLMs' positions."""
    for name, cfg in (("llm", llm), ("llm_small", llm_small)):
        for key in ("vqa_max_new_tokens", "caption_max_new_tokens"):
            if mapper.num_query_tokens + getattr(evaluation, key) > cfg.max_positions:
                yield Problem(("mapper.num_query_tokens", f"evaluation.{key}", f"{name}.max_positions"),
                              (mapper.num_query_tokens, getattr(evaluation, key), cfg.max_positions),
                              f"mapper.num_query_tokens + evaluation.{key} must leave room for the prompt in "
                              f"{name}.max_positions")


@across("encoder", "data")
def _patches_tile_the_images(encoder: EncoderConfig, data: ScenesConfig) -> Iterator[Problem]:
    """mmskip.foundation.encoder.pretrain_encoder."""
    if data.image_size % encoder.patch_size:
        yield Problem(("encoder.patch_size", "data.image_size"), (encoder.patch_size, data.image_size),
                      "encoder.patch_size must divide data.image_size")


@across("llm", "llm_small", "data")
def _llm_batches_fit_the_corpus(llm: LLMConfig, llm_small: LLMConfig, data: ScenesConfig) -> Iterator[Problem]:
    """A pretraining batch draws distinct documents: at most one per scene (foundation.llm)."""
    scenes = data.num_train + data.num_text_scenes
    for name, cfg in (("llm", llm), ("llm_small", llm_small)):
        if cfg.batch_size > scenes:
            yield Problem((f"{name}.batch_size", "data.num_train", "data.num_text_scenes"),
                          (cfg.batch_size, data.num_train, data.num_text_scenes),
                          f"{name}.batch_size must not exceed the {scenes} pretraining scenes")


@across("pruning", "data")
def _calibration_examples_exist(pruning: PruningConfig, data: ScenesConfig) -> Iterator[Problem]:
    """Wanda calibrates on distinct training examples of each task (pruning.calibration)."""
    most = data.num_train * data.questions_per_image
    if pruning.num_calibration > most:
        yield Problem(("pruning.num_calibration", "data.num_train", "data.questions_per_image"),
                      (pruning.num_calibration, data.num_train, data.questions_per_image),
                      f"pruning.num_calibration must not exceed data.num_train x data.questions_per_image = "
                      f"{most}, the most VQA training examples there are")


@across("bench_prune", "llm")
def _prune_bench_fits_the_llm(bench_prune: PruneBenchConfig, llm: LLMConfig) -> Iterator[Problem]:
    """bench_prune calibrates the default LLM on sequences of sequence_length tokens."""
    if bench_prune.sequence_length > llm.max_positions:
        yield Problem(("bench_prune.sequence_length", "llm.max_positions"), (bench_prune.sequence_length,
                                                                              llm.max_positions),
                      "bench_prune.sequence_length must not exceed llm.max_positions")


# --- the JSON schema ---------------------------------------------------------------------------

def params_schema() -> dict:
    """The JSON schema of params.yaml: every key required, with its description, type, bounds and
    default (``Params()``'s value)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "mmskip params",
            "description": "Parameters of the mmskip pipeline (params.yaml).", **_object_schema(Params, Params())}


def _object_schema(cls: type, defaults: Any) -> dict:
    properties = {}
    for f in dataclasses.fields(cls):
        tp, default = _hints(cls)[f.name], getattr(defaults, f.name)
        if _is_section(tp):
            properties[f.name] = {"description": f.metadata["description"], **_object_schema(tp, default)}
        else:
            properties[f.name] = _key_schema(tp, f.metadata, default)
    return {"type": "object", "additionalProperties": False, "required": list(properties), "properties": properties}


def _key_schema(tp: Any, meta: Mapping[str, Any], default: Any) -> dict:
    words = {k: list(meta[k]) if k == "enum" else meta[k] for k in _KEYWORDS if k in meta}
    schema: dict[str, Any] = {"description": meta["description"]}
    if _is_list(tp):
        schema.update(type="array", minItems=1, uniqueItems=True)
        schema["items"] = {"type": _JSON_TYPES[_item_type(tp)], **words}
    else:
        schema.update(type=_JSON_TYPES[tp], **words)
    if default is not None:
        schema["default"] = _shown(default)
    return schema


def schema_yaml() -> str:
    """The text of workflow/schemas/params.schema.yaml."""
    import yaml

    class Dumper(yaml.SafeDumper):  # lists of values and `items` on one line, keys one per line
        def represent_list(self, data):
            flow = not any(isinstance(v, (dict, list)) for v in data)
            return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

        def represent_dict(self, data):
            flow = "description" not in data and not any(isinstance(v, dict) for v in data.values())
            return self.represent_mapping("tag:yaml.org,2002:map", data, flow_style=flow)

    Dumper.add_representer(list, Dumper.represent_list)
    Dumper.add_representer(dict, Dumper.represent_dict)
    text = yaml.dump(params_schema(), Dumper=Dumper, sort_keys=False, allow_unicode=True, width=110)
    return SCHEMA_HEADER + re.sub(r"(?<!properties:)\n(  \w+:\n)", r"\n\n\1", text)  # a blank line between sections


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmskip.params",
                                     description="Write the JSON schema of params.yaml, generated from the "
                                                 "dataclasses of mmskip.params.")
    parser.add_argument("--out", type=Path, default=None, help=f"file to write, e.g. {SCHEMA_PATH} (default: stdout)")
    parser.add_argument("--check", action="store_true", help="only compare with --out; exit 1 if it is stale")
    args = parser.parse_args(argv)
    text = schema_yaml()
    if args.out is None:
        sys.stdout.write(text)
    elif args.check:
        if not args.out.is_file() or args.out.read_text(encoding="utf-8") != text:
            raise SystemExit(f"{args.out} is stale: run python -m mmskip.params --out {args.out}")
    else:
        from mmskip.io import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
