"""mmskip.params: one torch-free module holds every params section as a dataclass, and the JSON
schema of params.yaml is generated from it. Nothing here runs Snakemake (tests/test_workflow.py
does, for the messages `snakemake -n` prints)."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys

import jsonschema
import pytest
import yaml

from mmskip.compression.names import TRAIN_VARIANTS
from mmskip.params import (SCHEMA_PATH, SECTIONS, Params, ParamsError, ScenesConfig, params_problems,
                           schema_yaml)
from workflow_utils import REPO, read_params

PARAMS = read_params(REPO / "params.yaml")


def test_params_and_cli_import_no_heavy_library():
    code = ("import sys, mmskip.params, mmskip.cli; "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'transformers', 'PIL'}); "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_committed_schema_is_the_generated_one():
    committed = (REPO / SCHEMA_PATH).read_text(encoding="utf-8")
    assert committed == schema_yaml(), f"{SCHEMA_PATH} is stale: run python -m mmskip.params --out {SCHEMA_PATH}"


def test_check_flag_reports_a_stale_schema(tmp_path):
    stale = tmp_path / "schema.yaml"
    stale.write_text(schema_yaml() + "# edited\n", encoding="utf-8")
    run = [sys.executable, "-m", "mmskip.params", "--check", "--out", str(stale)]
    assert subprocess.run(run, capture_output=True, text=True).returncode == 1
    subprocess.run([sys.executable, "-m", "mmskip.params", "--out", str(stale)], check=True)
    assert subprocess.run(run, capture_output=True, text=True).returncode == 0


def test_dataclass_defaults_are_the_embedded_params():
    assert Params.from_dict(PARAMS) == Params()
    assert set(PARAMS) == {f.name for f in dataclasses.fields(Params)}


def test_constants_agree_with_the_modules_that_use_them():
    from mmskip import params
    from mmskip.data.scenes import COLORS, SPLITS
    from mmskip.mapper.model import MapperConfig

    assert params.NUM_COLORS == len(COLORS) and params.SPLITS == SPLITS
    for output in params.MAPPER_OUTPUTS:
        MapperConfig(output=output, vocab_size=8)
    with pytest.raises(ValueError, match="output='other'"):
        MapperConfig(output="other")
    from mmskip.cli import build_parser
    from mmskip.data.msrvtt import SPLIT_LISTS

    # MSR-VTT's splits: the params enum, the converter's lists and the command's choices
    split = params.SourcesConfig.__dataclass_fields__["msrvtt_split"].metadata
    prepare = build_parser()._subparsers._group_actions[0].choices["prepare_msrvtt"]
    assert tuple(split["enum"]) == tuple(SPLIT_LISTS) == tuple(
        next(a for a in prepare._actions if a.dest == "split").choices)


def test_every_key_is_described():
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("description", "").strip(), f"{name}.{f.name}"


def _out_of_range(schema: dict) -> list:
    """Values just outside a key's bounds."""
    values = []
    for keyword, step in (("minimum", -1), ("maximum", 1)):
        if keyword in schema:
            values.append(schema[keyword] + step)
    values += [schema[k] for k in ("exclusiveMinimum", "exclusiveMaximum") if k in schema]
    return values


def test_a_section_refuses_what_the_schema_refuses():
    """Every bound and allowed value of the schema, the dataclass enforces too (the CLI's check)."""
    schema = yaml.safe_load(schema_yaml())
    checked = 0
    for name, cls in SECTIONS.items():
        section_schema = schema["properties"][name]
        for key, key_schema in section_schema["properties"].items():
            item = key_schema.get("items", key_schema)
            bad_values = _out_of_range(item) + (["not-allowed"] if "enum" in item or "pattern" in item else [])
            for bad in bad_values:
                value = [bad] if key_schema["type"] == "array" else bad
                given = {**PARAMS[name], key: value}
                assert list(jsonschema.Draft202012Validator(section_schema).iter_errors(given)), (name, key, value)
                with pytest.raises(ParamsError, match=rf"^{key}="):
                    cls(**{key: value})
                checked += 1
    assert checked > 100


def test_a_section_names_every_problem_at_once():
    with pytest.raises(ParamsError) as err:
        ScenesConfig(num_train=0, image_size=8)
    assert "2 problems" in str(err.value)
    assert "num_train=0: must be >= 1 and <= 1000000" in str(err.value)
    assert "image_size=8: must be >= 24 and <= 512" in str(err.value)
    assert [p.keys for p in err.value.problems] == [("image_size",), ("num_train",)]


# Overrides of params.yaml that every key allows alone, but that break a rule across keys or
# sections; each problem names the keys, their values and what is allowed.
CROSS = {
    "N:M with N >= M": (
        {"pruning": {"nm_patterns": ["5:4"]}},
        "pruning.nm_patterns = ['5:4']: each 'N:M' must have 0 < N < M"),
    "M not dividing the LLM's widths": (
        {"pruning": {"nm_patterns": ["2:4", "3:5"]}},
        "pruning.nm_patterns = ['2:4', '3:5'], llm.hidden_size = 96, llm.ffn_dim = 192: M of each 'N:M' "
        "must divide llm.hidden_size and llm.ffn_dim"),
    "start layer past the LLM": (
        {"skipping": {"start_layers": [-1, 7]}},
        "skipping.start_layers = [-1, 7], llm.num_layers = 6: each start layer must be from -1 to 4"),
    "drop_last the whole LLM": (
        {"skipping": {"drop_last": [1, 6]}},
        "skipping.drop_last = [1, 6], llm.num_layers = 6: each must be from 1 to 5"),
    "end layer past the LLM": (
        {"skipping": {"end_layer": 7}},
        "skipping.end_layer = 7, llm.num_layers = 6: must be from 0 to 6"),
    "skipped mapper skipping nothing": (
        {"train_compressed": {"start_layer": 5}},
        "train_compressed.interval = 2, train_compressed.start_layer = 5, llm.num_layers = 6: "
        "the skipped mapper's plan must skip at least one layer"),
    "subnet sparsity without task masks": (
        {"subnet": {"sparsity": 0.4}},
        "subnet.sparsity = 0.4, pruning.sparsities = [0.3, 0.5, 0.7]: subnet.sparsity must be "
        "one of pruning.sparsities"),
    "seeds not led by the seed": (
        {"seeds": [1, 0]},
        "seeds = [1, 0], seed = 0: the first seed must be seed (0)"),
    "token layer past the LLM": (
        {"token_skipping": {"visual_exit_layers": [1, 5]}},
        "token_skipping.visual_exit_layers = [1, 5], llm.num_layers = 6: each layer must be from 0 to 4"),
    "train sparsity without a mask": (
        {"train_compressed": {"sparsity": 0.6}},
        "train_compressed.sparsity = 0.6, pruning.sparsities = [0.3, 0.5, 0.7]: train_compressed.sparsity must be"),
    "subnet without wanda": (
        {"compression": {"mask_sets": ["magnitude", "subnet"]}},
        "compression.mask_sets = ['magnitude', 'subnet']: 'subnet' combines Wanda masks, so needs 'wanda'"),
    "warmup of the fine-tuned variants": (
        {"train_compressed": {"finetune_caption_steps": 50}},
        "mapper.warmup_steps = 50, train_compressed.finetune_caption_steps = 50: mapper.warmup_steps must be below"),
    "warmup not below steps": (
        {"llm_small": {"steps": 100}},
        "llm_small.warmup_steps = 100, llm_small.steps = 100: warmup_steps must be below steps"),
    "heads do not divide the width": (
        {"mapper": {"num_heads": 5}},
        "mapper.hidden_size = 128, mapper.num_heads = 5: num_heads must divide hidden_size"),
    "fewer objects at most than at least": (
        {"data": {"min_objects": 4, "max_objects": 3}},
        "data.min_objects = 4, data.max_objects = 3: min_objects must not exceed max_objects"),
    "patches not tiling the images": (
        {"encoder": {"patch_size": 5}},
        "encoder.patch_size = 5, data.image_size = 48: encoder.patch_size must divide data.image_size"),
    "query and answer tokens past the positions": (
        {"mapper": {"num_query_tokens": 250}, "llm_small": {"max_positions": 256}},
        "mapper.num_query_tokens = 250, evaluation.caption_max_new_tokens = 24, llm_small.max_positions = 256"),
    "more calibration examples than questions": (
        {"pruning": {"num_calibration": 24001}},
        "pruning.num_calibration = 24001, data.num_train = 4000, data.questions_per_image = 6"),
    "pretraining batch larger than the corpus": (
        {"data": {"num_train": 10, "num_text_scenes": 0}, "llm": {"batch_size": 10}, "llm_small": {"batch_size": 11},
         "pruning": {"num_calibration": 60}},
        "llm_small.batch_size = 11, data.num_train = 10, data.num_text_scenes = 0"),
    "bench start layer past the model": (
        {"bench": {"start_layer": 11}},
        "bench.start_layer = 11, bench.num_layers = 12: start_layer must be from -1 to 10"),
    "bench plans skipping nothing": (
        {"bench": {"num_layers": 4, "interval": 4, "start_layer": 0}},
        "bench.interval = 4, bench.start_layer = 0, bench.num_layers = 4: the plans must skip at least one layer"),
    "bench_prune sequences past the LLM's positions": (
        {"bench_prune": {"sequence_length": 321}},
        "bench_prune.sequence_length = 321, llm.max_positions = 320"),
}


def _override(changes: dict) -> dict:
    params = copy.deepcopy(PARAMS)
    for section, values in changes.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:  # a top-level key (seeds)
            params[section] = values
    return params


@pytest.mark.parametrize("changes, expected", CROSS.values(), ids=CROSS.keys())
def test_rules_across_keys_name_keys_values_and_what_is_allowed(changes, expected):
    problems = [p.describe(" = ") for p in params_problems(_override(changes))]
    assert len(problems) == 1 and problems[0].startswith(expected), problems
    with pytest.raises(ParamsError, match=expected.split(" = ")[0]):
        Params.from_dict(_override(changes))


def test_the_rules_of_a_training_variant_apply_only_where_it_is_listed():
    """A skip plan skipping nothing, a sparsity with no mask, warmup at the fine-tuning steps: each refused with its
    variant listed (CROSS above), accepted without it."""
    for changes, variant in (({"start_layer": 5}, "skipped"), ({"sparsity": 0.6}, "pruned"),
                             ({"finetune_caption_steps": 50}, "dense")):
        others = [v for v in TRAIN_VARIANTS if v != variant and (variant != "dense" or v == "small")]
        assert params_problems(_override({"train_compressed": {**changes, "variants": others}})) == [], variant
    assert params_problems(_override({"train_compressed": {"small_caption_steps": 50, "variants": ["dense"]}})) == []
    with pytest.raises(ParamsError, match=r"variants=\['dense', 'tiny'\]"):
        Params.from_dict(_override({"train_compressed": {"variants": ["dense", "tiny"]}}))
    with pytest.raises(ParamsError, match=r"variants=\['small', 'small'\]"):
        Params.from_dict(_override({"train_compressed": {"variants": ["small", "small"]}}))


def test_a_renamed_key_is_refused_with_its_new_name():
    params = copy.deepcopy(PARAMS)
    params["compression"]["methods"] = params["compression"].pop("mask_sets")
    params["train_compressed"]["skip_interval"] = params["train_compressed"].pop("interval")
    assert [p.describe(" = ").split("; allowed")[0] for p in params_problems(params)] == [
        "compression.methods = ['magnitude', 'wanda', 'random', 'subnet']: unknown key (renamed: compression.mask_sets)",
        "train_compressed.skip_interval = 2: unknown key (renamed: train_compressed.interval)"]


def test_default_params_break_no_rule():
    assert params_problems(PARAMS) == []
    assert Params().problems() == []


def test_every_problem_of_every_section_is_reported_at_once():
    params = _override({"pruning": {"nm_patterns": ["5:4"]}, "skipping": {"start_layers": [7]},
                        "data": {"num_train": 0}, "report": {"num_qualitative": -1}})
    params["tokenizer"]["vocab"] = 1024
    found = {p.keys[0] for p in params_problems(params)}
    assert found == {"pruning.nm_patterns", "skipping.start_layers", "data.num_train",
                     "report.num_qualitative", "tokenizer.vocab"}


def test_skipped_sections_are_neither_read_nor_checked():
    params = _override({"data": {"num_train": "many"}, "skipping": {"start_layers": [7]}})
    assert params_problems(params, skip={"data", "skipping"}) == []
    assert [p.keys for p in params_problems(params, skip={"data"})] == [("skipping.start_layers", "llm.num_layers")]


def test_the_cli_refuses_a_bad_value_itself(tmp_path):
    """`dvc repro` runs the commands without the Snakefile's check: they refuse bad values too."""
    out = tmp_path / "masks"
    result = subprocess.run([sys.executable, "-m", "mmskip.cli", "prune", "--method", "magnitude", "--llm", "llm",
                             "--out", str(out), "--seed", "0", "--nm_patterns", "2:4", "5:4"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "mmskip prune: invalid parameter: nm_patterns=['2:4', '5:4']: each 'N:M' must have 0 < N < M" \
        in result.stderr, result.stderr
    assert not out.exists()


AST = "MIT/ast-finetuned-audioset-10-10-0.4593"
PAPER_SOURCES = {"data": "coco", "llm": "facebook/opt-2.7b", "llm_small": "facebook/opt-1.3b",
                 "encoder": "openai/clip-vit-large-patch14"}


def _with(tasks: list[str], sources: dict, mask_sets: list[str] | None = None) -> dict:
    params = copy.deepcopy(PARAMS)
    params["tasks"] = tasks
    params["sources"].update(sources)
    if mask_sets is not None:
        params["compression"]["mask_sets"] = mask_sets
    return params


def test_each_modality_of_the_tasks_needs_its_encoder_and_no_other():
    """The audio task (Clotho) needs sources.audio_encoder; an audio-only run needs no image encoder; the image
    tasks need no audio encoder; LLaVA sees images alone."""
    problems = [p.describe(" = ") for p in params_problems(_with(["vqa", "caption", "clotho"], PAPER_SOURCES))]
    assert problems == ["sources.data = 'coco', sources.audio_encoder = '': sources.data 'coco' needs a hub id for "
                        "audio_encoder (the pipeline pretrains its own models only on the scenes); tasks ['vqa', "
                        "'caption', 'clotho'] are image, audio"]
    assert params_problems(_with(["vqa", "caption", "clotho"], {**PAPER_SOURCES, "audio_encoder": AST})) == []
    audio_only = {**PAPER_SOURCES, "encoder": "", "audio_encoder": AST}
    assert params_problems(_with(["clotho"], audio_only, ["magnitude", "wanda"])) == []
    assert params_problems(_with(["vqa", "caption"], PAPER_SOURCES)) == []
    llava = {"data": "coco", "llava": "llava-hf/llava-1.5-7b-hf"}
    assert [p.describe(" = ") for p in params_problems(_with(["caption", "clotho"], llava))] == [
        "tasks = ['caption', 'clotho'], sources.llava = 'llava-hf/llava-1.5-7b-hf': sources.llava sees images alone: "
        "the audio tasks ['clotho'] need the trained pipeline"]
    video = [p.describe(" = ") for p in params_problems(_with(["msrvtt", "clotho"], audio_only, ["wanda"]))]
    assert video == ["sources.data = 'coco', sources.video_encoder = '': sources.data 'coco' needs a hub id for "
                     "video_encoder (the pipeline pretrains its own models only on the scenes); tasks ['msrvtt', "
                     "'clotho'] are video, audio"]
    # on the scenes the pipeline pretrains a video and an audio encoder (on the generated clips and sounds); the
    # downloaded datasets are refused there whatever the encoders
    on_scenes = [p.describe(" = ") for p in params_problems(_with(["vqa", "caption", "clotho"], {}))]
    assert [p.split(":")[0] for p in on_scenes] == ["tasks = ['vqa', 'caption', 'clotho'], sources.data = 'scenes'"]
    assert params_problems(_with(["vqa", "audio_qa"], {})) == []
    assert params_problems(_with(["vqa", "video_qa", "video_caption", "audio_caption"], {})) == []
    video = [p.describe(" = ") for p in params_problems(_with(["vqa", "msrvtt"], {}))]
    assert [p.split(":")[0] for p in video] == ["tasks = ['vqa', 'msrvtt'], sources.data = 'scenes'"]


def test_the_audiocaps_task_needs_the_users_folder_and_a_clip_name_over_its_columns():
    """AudioCaps is on YouTube only: its task reads the user's folder of clips, named by a template."""
    sources = {**PAPER_SOURCES, "audio_encoder": AST}
    without = [p.describe(" = ") for p in params_problems(_with(["audiocaps"], sources, ["wanda"]))]
    assert without == ["tasks = ['audiocaps'], sources.audiocaps_audio = '': the audiocaps task reads your own folder "
                       "(no stage downloads what it holds): give it"]
    folder = {**sources, "audiocaps_audio": "/data/audiocaps-clips"}
    assert params_problems(_with(["audiocaps"], folder, ["wanda"])) == []
    bad = [p.describe(" = ") for p in params_problems(_with(["audiocaps"], {**folder, "audiocaps_clip_name":
                                                                           "{ytid}.wav"}, ["wanda"]))]
    assert len(bad) == 1 and bad[0].startswith("sources.audiocaps_clip_name = '{ytid}.wav': a file name using "
                                               "{youtube_id}")
    assert len(params_problems(_with(["vqa", "caption"], {"audiocaps_clip_name": "{ytid}.wav"}))) == 1  # always
