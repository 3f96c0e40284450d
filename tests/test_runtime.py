"""Device and dtype from params (section ``runtime``): the stages that run the LLM or the encoder take
them, and exactly those ask SLURM for a GPU when the device is cuda. Here (no GPU) the dtype path
runs for real in bfloat16 on the CPU; a CUDA device is refused by name before any work."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from test_resume import workdir  # noqa: F401  (a fixture: scenes, tokenizer, tiny OPT at llm, encoder)
from workflow_utils import BIN, REPO, _job_blocks, check, copy_workflow, read_params, run

from mmskip.cli import main
from mmskip.compression.pruning import load_masks
from mmskip.compression.run import prune_stage
from mmskip.evaluation.baseline import decode_baseline
from mmskip.evaluation.evaluate import evaluate
from mmskip.features.cache import FeaturesConfig, cache_features, load_features
from mmskip.foundation.text import PromptsConfig
from mmskip.mapper.train import MapperTrainConfig, train_mapper
from mmskip.params import EvaluationConfig, Params, PruningConfig
from mmskip.stages import STAGES, Param, Stage

# the stages that run the LLM or the encoder: on runtime.device, a GPU each on SLURM when it is cuda
GPU_STAGES = {"cache_features", "train_mapper", "evaluate", "baseline", "evaluate_skip", "evaluate_tokens",
              "prune_wanda", "evaluate_compressed", "train_compressed", "evaluate_trained", "evaluate_llava",
              "train_mapper_seed", "baseline_seed"}
MAPPER = MapperTrainConfig(num_query_tokens=2, num_layers=1, hidden_size=16, num_heads=2, vqa_steps=6, caption_steps=6,
                           batch_size=8, warmup_steps=1, checkpoint_every=0)
EVALUATION = EvaluationConfig(split="test", batch_size=4, vqa_max_new_tokens=3)


def test_bfloat16_runs_the_frozen_models_in_bfloat16_and_keeps_the_mapper_in_float32(workdir):
    features = FeaturesConfig(batch_size=16, shard_size=16)
    cache_features(workdir / "scenes", workdir / "encoder", workdir / "f32", features)
    cache_features(workdir / "scenes", workdir / "encoder", workdir / "bf16", features, device="cpu",
                   dtype=torch.bfloat16)
    f32, rows32 = load_features(workdir / "f32", "train")
    bf16, rows16 = load_features(workdir / "bf16", "train")
    assert f32.dtype == torch.float32 and bf16.dtype == torch.bfloat16 and rows16 == rows32
    assert torch.allclose(bf16.float(), f32, rtol=0.05, atol=0.05) and not torch.equal(bf16.float(), f32)

    metrics = train_mapper("vqa", workdir / "scenes", workdir / "bf16", workdir / "llm", workdir / "mapper",
                           workdir / "mapper.json", 0, MAPPER, PromptsConfig(), dtype=torch.bfloat16)
    assert metrics["steps"] == 6 and all(map(lambda x: x == x, metrics["loss_curve"]))  # finite, not NaN
    with safe_open(str(workdir / "mapper" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}

    for name, run_ in [("baseline", decode_baseline), ("eval", evaluate)]:
        args = ("vqa", workdir / "scenes", workdir / "bf16", workdir / "llm", workdir / "mapper",
                workdir / name, PromptsConfig(), EVALUATION)
        if run_ is evaluate:
            args = ("vqa", ["multimodal"], *args[1:])
        result = run_(*args, dtype=torch.bfloat16)
        result = result["multimodal"] if run_ is evaluate else result  # evaluate: input -> its metrics
        assert result["num_examples"] == 12  # 4 test images, 3 questions each



def test_wanda_calibrates_in_bfloat16(workdir, tmp_path):
    (tmp_path / "mappers").mkdir()
    cache_features(workdir / "scenes", workdir / "encoder", tmp_path / "features", FeaturesConfig(),
                   dtype=torch.bfloat16)
    for task in ("vqa", "caption"):
        train_mapper(task, workdir / "scenes", tmp_path / "features", workdir / "llm", tmp_path / "mappers" / task,
                     tmp_path / f"{task}.json", 0, MAPPER, PromptsConfig(), dtype=torch.bfloat16)
    cfg = PruningConfig(sparsities=(0.5,), nm_patterns=("2:4",), calibration="prompt", calibration_modes=("prompt",),
                        compare_sparsity=0.5, num_calibration=8, calibration_batch_size=4)
    index = prune_stage("wanda", workdir / "llm", tmp_path / "wanda", cfg, 0, scenes=workdir / "scenes",
                        features=tmp_path / "features", mappers=tmp_path / "mappers", prompts=PromptsConfig(),
                        dtype=torch.bfloat16)
    assert {e["task"] for e in index["entries"]} == {"vqa", "caption"}
    for entry in index["entries"]:
        masks = load_masks(tmp_path / "wanda" / entry["path"])
        assert abs(entry["achieved"]["overall"] - 0.5) < 0.01 and all(m.dtype == torch.bool for m in masks.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_by_name_before_any_work(tmp_path):
    args = ["baseline", "--task", "vqa", "--scenes", str(tmp_path / "none"), "--features", str(tmp_path / "none"),
            "--mapper", str(tmp_path / "none"), "--llm", str(tmp_path / "none"), "--out", str(tmp_path / "out"),
            "--device", "cuda", "--dtype", "bfloat16"]
    with pytest.raises(SystemExit, match=r"mmskip baseline: device='cuda': not available on this machine"):
        main(args)
    with pytest.raises(SystemExit, match=r"device='gpu0': must match the regular expression"):
        main([*args[:-4], "--device", "gpu0"])
    with pytest.raises(SystemExit, match=r"dtype='half': allowed one of 'float32', 'bfloat16', 'float16'"):
        main([*args[:-4], "--dtype", "half"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, gpu", [("cpu", False), ("cuda", True), ("cuda:1", True)])
def test_exactly_the_stages_that_run_the_models_take_the_runtime_and_ask_for_a_gpu(device, gpu):
    params = {**read_params(REPO / "params.yaml"), "runtime": {"device": device, "dtype": "bfloat16"}}
    Params.from_dict(params)  # valid
    for stage in STAGES:
        resources = stage.resources(params)
        assert resources["mem_mb"] == stage.mem_mb
        assert ("gpu" in resources) == (gpu and stage.name in GPU_STAGES), stage.name
        wildcards = {v.name: v.resolve(params)[0] for v in stage.vars}
        rendered = stage.render(params, wildcards)
        assert (f"--device {device} --dtype bfloat16" in rendered) == (stage.name in GPU_STAGES), stage.name


def test_a_stage_whose_gpu_flag_and_command_disagree_is_refused():
    with pytest.raises(ValueError, match=r"stage evaluate: gpu=True but its command lacks \{params.runtime\}"):
        Stage("evaluate", "mmskip evaluate --out x", outputs={}, log="x", gpu=True)
    with pytest.raises(ValueError, match=r"stage evaluate: gpu=False but its command takes \{params.runtime\}"):
        Stage("evaluate", "mmskip evaluate {params.runtime}", outputs={}, params={"runtime": Param("runtime")},
              log="x")


def test_snakemake_asks_slurm_for_a_gpu_for_exactly_those_jobs(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    out = check(run([BIN / "snakemake", "-n", "--cores", "2", "--config",
                     'runtime={"device": "cuda", "dtype": "bfloat16"}'], cwd=wf))
    jobs = list(_job_blocks(out.stdout + out.stderr))
    assert len(jobs) > 40
    for name, block in jobs:
        rule = name.split("@")[0]
        resources = re.search(r"^\s+resources: (.*)$", block, re.M).group(1)
        assert ("gpu=1" in resources.split(", ")) == (rule in GPU_STAGES), (name, resources)
    out = check(run([BIN / "snakemake", "-n", "--cores", "2"], cwd=wf))  # params.yaml: cpu
    assert "gpu=" not in out.stdout + out.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_stages_run_on_the_gpu(workdir, tmp_path):
    cache_features(workdir / "scenes", workdir / "encoder", tmp_path / "features", FeaturesConfig(), device="cuda",
                   dtype=torch.bfloat16)
    train_mapper("vqa", workdir / "scenes", tmp_path / "features", workdir / "llm", tmp_path / "mapper",
                 tmp_path / "mapper.json", 0, MAPPER, PromptsConfig(), device="cuda", dtype=torch.bfloat16)
    result = decode_baseline("vqa", workdir / "scenes", tmp_path / "features", workdir / "llm", tmp_path / "mapper",
                             tmp_path / "baseline", PromptsConfig(), EVALUATION, device="cuda", dtype=torch.bfloat16)
    assert result["num_examples"] == 12
