"""The GPU-hours estimate (mmskip estimate): its decode FLOPs equal the skip engine's own count exactly,
its rows are the GPU stages of the stage table, and what it cannot know is refused by name."""

import json

import pytest
import torch
import yaml

from mmskip.estimate import Shape, estimate, generation_flops
from mmskip.params import merged
from mmskip.skipping.engine import SkipEngine
from mmskip.stages import stage_table
from test_hub import COMMIT
from test_paper_mini import fill_hub_cache, paper_mini
from test_skipping import FAMILIES, VOCAB, tiny
from workflow_utils import REPO, read_params

DEFAULT = read_params(REPO / "params.yaml")
# The estimate sizes the run's dataset (the scenes, or COCO): the default's image tasks. Its video and audio tasks
# read the generated clips and sounds, datasets of their own, which it refuses by name (as OK-VQA's and GQA's).
PARAMS = merged(DEFAULT, {"tasks": ["vqa", "caption"]})


def test_the_default_video_and_audio_tasks_are_refused_by_name():
    with pytest.raises(ValueError, match=r"tasks \['video_qa', 'video_caption', 'audio_qa', 'audio_caption'\] read "
                                         r"datasets of their own \(clips, clips, sounds, sounds\)"):
        estimate(DEFAULT, 100.0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt, new_tokens", [(6, 1), (9, 5)])
def test_generation_flops_equal_the_engines_count_of_an_unskipped_decode(family, prompt, new_tokens):
    model = tiny(family)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (3, prompt), generator=g)
    engine = SkipEngine(model)
    engine.generate(torch.ones_like(ids), input_ids=ids, max_new_tokens=new_tokens, eos_token_id=None)
    counted = sum(engine.stats.full.values())
    shape = Shape.of_config(model.config.to_dict(), family)
    assert shape.ffn_matrices == (3 if family == "llama" else 2)
    assert generation_flops(shape, 3, prompt, new_tokens) == counted


def test_the_default_estimate_has_a_row_per_gpu_stage_and_scales_with_the_throughput():
    result = estimate(PARAMS, 100.0)
    assert [r["stage"] for r in result["stages"]] == [s.name for s in stage_table(PARAMS) if s.gpu]
    assert result["total_pflop"] == pytest.approx(sum(r["pflop"] for r in result["stages"]))
    rows = {r["stage"]: r for r in result["stages"]}
    # evaluate decodes the whole split once per input (multimodal, blind) greedily: twice the baseline
    assert rows["evaluate"]["pflop"] == pytest.approx(2 * rows["baseline"]["pflop"])
    assert result["dataset"]["test"] == {"images": 600, "questions": 3600, "captions": 3000}
    assert result["visual_tokens"] == (48 // 8) ** 2 + 1
    faster = estimate(PARAMS, 200.0)
    assert faster["total_gpu_hours"] == pytest.approx(result["total_gpu_hours"] / 2)
    assert faster["total_pflop"] == result["total_pflop"]
    with pytest.raises(ValueError, match=r"tflops=0: allowed a sustained throughput above 0"):
        estimate(PARAMS, 0)


def test_the_estimate_counts_params_tasks_alone():
    both = {r["stage"]: r for r in estimate(PARAMS, 100.0)["stages"]}
    one = merged(PARAMS, {"tasks": ["vqa"], "compression": {"mask_sets": ["magnitude", "wanda", "random"]}})
    rows = {r["stage"]: r for r in estimate(one, 100.0)["stages"]}
    assert list(rows) == [s.name for s in stage_table(one) if s.gpu]
    for stage in ("train_mapper", "evaluate", "baseline", "evaluate_skip", "evaluate_compressed", "evaluate_trained"):
        assert (both[stage]["jobs"], rows[stage]["jobs"]) == (len(PARAMS["tasks"]), 1), stage  # one job per task
    assert 0 < rows["baseline"]["pflop"] < both["baseline"]["pflop"]
    # train_compressed.variants: a job per listed variant and task; evaluate_trained decodes their points alone
    pruned = {r["stage"]: r for r in estimate(merged(PARAMS, {"train_compressed": {"variants": ["pruned"]}}),
                                              100.0)["stages"]}
    assert (both["train_compressed"]["jobs"], pruned["train_compressed"]["jobs"]) == (4 * len(PARAMS["tasks"]),
                                                                                      len(PARAMS["tasks"]))
    for stage in ("train_compressed", "evaluate_trained"):
        assert 0 < pruned[stage]["pflop"] < both[stage]["pflop"], stage


def test_a_paper_config_reads_its_models_configs_from_the_hub_cache_and_counts_a_prepared_folder(tmp_path,
                                                                                               monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fill_hub_cache(tmp_path / "hub")
    params = merged(PARAMS, paper_mini(tmp_path / "catalog.yaml", tmp_path / "hub"))
    # paper-mini's tasks read datasets of their own, whose sizes the estimate does not know
    with pytest.raises(ValueError, match=r"tasks \['okvqa', 'msrvtt', 'clotho'\] read datasets of their "
                                         r"own \(okvqa, msrvtt, clotho\), "
                                         r"whose sizes the estimate does not know"):
        estimate(params, 300.0)
    params["tasks"] = ["vqa", "caption"]
    result = estimate(params, 300.0)
    assert result["shapes"]["llm"]["source"] == f"facebook/opt-2.7b at {COMMIT}"
    assert (result["shapes"]["llm"]["layers"], result["shapes"]["encoder"]["hidden"]) == (4, 16)
    assert result["visual_tokens"] == (28 // 14) ** 2 + 1
    assert result["dataset"]["train"]["images"] == 113287  # COCO's Karpathy split, as published
    data = tmp_path / "coco" / "annotations"
    data.mkdir(parents=True)
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        (data / f"captions_{split}.json").write_text(json.dumps({
            "images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(n)],
            "annotations": [{"id": i, "image_id": i, "caption": "a"} for i in range(n)]}))
        (data / f"vqa_questions_{split}.json").write_text(json.dumps({"questions": [{"question_id": 1}] * 2 * n}))
    counted = estimate(params, 300.0, tmp_path / "coco")
    assert counted["dataset"]["test"] == {"images": 2, "questions": 4, "captions": 2}
    assert counted["total_pflop"] < result["total_pflop"]


def test_a_hub_model_neither_cached_nor_reachable_is_refused_with_the_fetch_command(tmp_path, monkeypatch, capsys):
    from mmskip.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"sources": {"hub_cache": str(tmp_path / "empty")}}))
    with pytest.raises(SystemExit) as err:
        main(["estimate", "--tflops", "300", "--params", str(REPO / "params.yaml"), "--configfile",
              str(REPO / "configs/paper/clip-opt-2.7b.yaml"), str(config)])
    message = str(err.value)
    assert message.startswith("mmskip estimate: llm facebook/opt-2.7b at main: its config.json is not in ")
    assert f"mmskip fetch_model --id facebook/opt-2.7b --revision main --cache {tmp_path / 'empty'}" in message
    main(["estimate", "--tflops", "50", "--params", str(REPO / "params.yaml"), "--configfile",
          str(REPO / "configs/embedded/image.yaml"), "--out", str(tmp_path / "e.json")])
    printed = capsys.readouterr().out
    assert printed.startswith("GPU-hours at a sustained 50 TFLOP/s per GPU (cpu, float32)")
    written = json.loads((tmp_path / "e.json").read_text())
    assert f"{'total':<22}{'':>6}{written['total_pflop']:>14.4g}{written['total_gpu_hours']:>12.4g}" in printed


# llava-hf/llava-1.5-7b-hf's config.json as published: its text_config leaves LlamaConfig's defaults out
LLAVA_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}


def test_the_llava_config_matches_the_published_checkpoint_and_is_estimated_per_grid_point(tmp_path, monkeypatch):
    """configs/paper/llava-1.5-7b.yaml's section llm is LLaVA-1.5-7B's language model as fetch_model checks it
    (the defaults config.json leaves out filled in), and its estimate counts the grid points on that model."""
    from mmskip.foundation.hub import language_config, shape_problems
    from mmskip.params import LLM_SHAPE_KEYS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llava = yaml.safe_load((REPO / "configs/paper/llava-1.5-7b.yaml").read_text(encoding="utf-8"))
    snapshot = tmp_path / "hub" / "models--llava-hf--llava-1.5-7b-hf" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAVA_CONFIG))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(COMMIT)
    assert shape_problems(language_config(snapshot), {k: llava["llm"][k] for k in LLM_SHAPE_KEYS}) == []
    params = merged(PARAMS, {**llava, "sources": {**llava["sources"], "hub_cache": str(tmp_path / "hub")}})
    result = estimate(params, 300.0)
    lm = result["shapes"]["llm"]
    assert (lm["layers"], lm["hidden"], lm["ffn"], lm["ffn_matrices"], lm["vocab"]) == (32, 4096, 11008, 3, 32064)
    assert result["visual_tokens"] == 576 and result["shapes"]["encoder"]["layers"] == 24
    assert [r["stage"] for r in result["stages"]] == ["evaluate_llava"]
    # intervals 2, 3, 4 of the official semantics from layer 0 in each scope, and the unskipped decode
    one_mode = estimate(merged(params, {"skipping": {"modes": ["skip_block"]}}), 300.0)
    assert one_mode["grid_points"] == 3 * len(params["skipping"]["scopes"])
    assert result["total_pflop"] > one_mode["total_pflop"] > 0
