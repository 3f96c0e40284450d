"""Mapper training survives SIGKILL: restarted, it resumes from its last checkpoint and writes the
same bytes as an uninterrupted run; checkpoints of another run are ignored; a successful run
leaves no checkpoint behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

from mmskip.data.scenes import ScenesConfig, make_scenes
from mmskip.features.cache import FeaturesConfig, cache_features
from mmskip.foundation.encoder import EncoderConfig, pretrain_encoder
from mmskip.foundation.text import PromptsConfig
from mmskip.foundation.tokenizer import TokenizerConfig, train_tokenizer
from mmskip.mapper.train import MapperTrainConfig

# Tiny everything: a mapper step takes a few milliseconds, so the 200 steps leave a window of
# about a second after the first checkpoint (step 10) in which to kill the job.
STEPS, EVERY = 200, 10
MAPPER = ["--num_query_tokens", "2", "--num_layers", "1", "--hidden_size", "16", "--num_heads", "2",
          "--vqa_steps", str(STEPS), "--batch_size", "8", "--warmup_steps", "2", "--checkpoint_every", str(EVERY)]
TIMEOUT = 120  # seconds, for any one wait on a training process


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Scenes, a tokenizer, a random tiny OPT and a barely trained encoder's cached features."""
    root = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    make_scenes(root / "scenes", seed=0, cfg=ScenesConfig(image_size=24, num_train=40, num_val=4, num_test=4,
                                                          num_text_scenes=10, min_objects=1, max_objects=3,
                                                          questions_per_image=3))
    train_tokenizer(root / "scenes", root / "tokenizer", TokenizerConfig(vocab_size=300), PromptsConfig())
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    llm = OPTForCausalLM(OPTConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=128, word_embed_proj_dim=16, do_layer_norm_before=True, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    pretrain_encoder(root / "scenes", root / "encoder", root / "encoder.json", 0,
                     EncoderConfig(patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, steps=2,
                                   batch_size=8, warmup_steps=1))
    cache_features(root / "scenes", root / "encoder", root / "features", FeaturesConfig(batch_size=64, shard_size=32))
    return root


def start(workdir: Path, name: str, checkpoints: str, seed: int = 0) -> tuple[subprocess.Popen, Path]:
    """`mmskip train_mapper` into out/{name}, logging to {name}-<n>.log (one log per start)."""
    log_path = workdir / f"{name}-{len(list(workdir.glob(f'{name}-*.log')))}.log"
    log = open(log_path, "w", encoding="utf-8")
    cmd = [sys.executable, "-m", "mmskip.cli", "train_mapper", "--task", "vqa", "--scenes", "scenes",
           "--features", "features", "--llm", "llm", "--out", f"out/{name}", "--metrics", f"out/{name}.json",
           "--checkpoint_dir", checkpoints, "--seed", str(seed), "--threads", "1", *MAPPER]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the child holds its own descriptor
    return proc, log_path


def finish(job: tuple[subprocess.Popen, Path]) -> str:
    """Wait for a training process to succeed; its log."""
    proc, log_path = job
    try:
        code = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    log = log_path.read_text(encoding="utf-8")
    assert code == 0, log
    return log


def kill_after_first_checkpoint(job: tuple[subprocess.Popen, Path], folder: Path) -> None:
    proc, log_path = job
    deadline = time.monotonic() + TIMEOUT
    while not list(folder.glob("step-*")):
        assert proc.poll() is None, (f"training ended (exit {proc.returncode}) before writing a checkpoint:\n"
                                     + log_path.read_text(encoding="utf-8"))
        assert time.monotonic() < deadline, f"no checkpoint in {folder} after {TIMEOUT} s"
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no handler, no finally block runs
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -9, proc.returncode


def artifacts(workdir: Path, name: str) -> dict[str, bytes]:
    """Every file of the mapper folder, and the metrics JSON, as bytes."""
    files = {p.name: p.read_bytes() for p in sorted((workdir / "out" / name).iterdir())}
    assert "model.safetensors" in files, sorted(files)
    return {**files, "metrics.json": (workdir / "out" / f"{name}.json").read_bytes()}


@pytest.fixture(scope="module")
def reference(workdir) -> dict[str, bytes]:
    """(a) The uninterrupted run."""
    log = finish(start(workdir, "reference", "checkpoints/reference"))
    assert "resumed from step" not in log and "ignoring checkpoint" not in log, log
    assert not (workdir / "checkpoints" / "reference").exists()  # (d) gone after success
    metrics = json.loads((workdir / "out" / "reference.json").read_text())
    assert metrics["steps"] == STEPS and len(metrics["loss_curve"]) == STEPS // 50
    return artifacts(workdir, "reference")


def test_killed_training_resumes_and_writes_identical_bytes(workdir, reference):
    checkpoints = workdir / "checkpoints" / "killed"
    kill_after_first_checkpoint(start(workdir, "killed", "checkpoints/killed"), checkpoints)

    # Nothing that looks complete: the outputs are written (atomically) only at the end.
    assert not (workdir / "out" / "killed").exists() and not (workdir / "out" / "killed.json").exists()
    # Only the latest checkpoint is kept, whole; the killed job may have left a temporary next to it.
    (latest,) = [p for p in checkpoints.iterdir() if not p.name.startswith(".")]
    saved = int(latest.name.removeprefix("step-"))
    assert saved > 0 and saved % EVERY == 0
    assert sorted(p.name for p in latest.iterdir()) == ["mapper.safetensors", "state.json", "train_state.pt"]
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == saved and len(state["losses"]) == saved
    train_state = torch.load(latest / "train_state.pt", weights_only=True)  # loadable without unpickling
    assert set(train_state) == {"optimizer", "scheduler", "torch_rng"}

    log = finish(start(workdir, "killed", "checkpoints/killed"))
    resumed = re.search(r"resumed from step (\d+)", log)
    assert resumed and int(resumed.group(1)) == saved, log
    assert artifacts(workdir, "killed") == reference
    assert not checkpoints.exists()  # (d)


def test_checkpoint_of_another_run_is_ignored(workdir, reference):
    checkpoints = workdir / "checkpoints" / "stale"
    # A genuine checkpoint, of the same command with another seed.
    kill_after_first_checkpoint(start(workdir, "stale", "checkpoints/stale", seed=1), checkpoints)
    assert list(checkpoints.glob("step-*"))

    log = finish(start(workdir, "stale", "checkpoints/stale", seed=0))
    assert "resumed from step" not in log, log
    ignored = re.search(r"ignoring checkpoint \S+step-\d+: it belongs to another run \(differs in ([^)]*)\)", log)
    assert ignored and "seed" in ignored.group(1).split(", "), log
    assert "starting fresh" in log, log
    assert artifacts(workdir, "stale") == reference  # trained from scratch, untouched by the stale state
    assert not checkpoints.exists()  # (d)


def test_cleanup_removes_only_checkpoints(tmp_path):
    from mmskip.training import _remove_checkpoints

    (tmp_path / "step-0000010").mkdir()
    (tmp_path / ".step-0000020.k3j2.tmp").mkdir()  # what a kill during a checkpoint write leaves
    (tmp_path / "notes.txt").write_text("not ours")
    _remove_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_negative_checkpoint_interval_is_refused_naming_the_value():
    with pytest.raises(ValueError, match=r"checkpoint_every=-1: must be >= 0"):
        MapperTrainConfig(checkpoint_every=-1)


def _train_dense(workdir: Path, name: str, *compression: str) -> dict:
    """`mmskip train_compressed --variant dense` (the control of training with compression) into out/{name}."""
    cmd = [sys.executable, "-m", "mmskip.cli", "train_compressed", "--variant", "dense", "--task", "vqa",
           "--scenes", "scenes", "--features", "features", "--llm", "llm", "--mapper", "out/reference",
           "--out", f"out/{name}",
           "--metrics", f"out/{name}.json", "--checkpoint_dir", f"checkpoints/{name}", "--seed", "0",
           "--threads", "1", *MAPPER, *compression]
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((workdir / "out" / f"{name}.json").read_text())


def test_dense_control_from_scratch_is_the_baseline_mapper(workdir, reference):
    metrics = _train_dense(workdir, "control-scratch", "--init", "scratch")
    assert (metrics["variant"], metrics["init"], metrics["steps"]) == ("dense", None, STEPS)
    # the same training as train_mapper, so the same weights: the control measures training, nothing else
    ours = artifacts(workdir, "control-scratch")
    assert ours["model.safetensors"] == reference["model.safetensors"]
    assert ours["config.json"] == reference["config.json"]


def test_dense_control_fine_tunes_the_baseline_for_the_compressed_variants_steps(workdir, reference):
    metrics = _train_dense(workdir, "control-tuned", "--init", "baseline", "--finetune_vqa_steps", "20")
    assert (metrics["variant"], metrics["init"], metrics["steps"]) == ("dense", "out/reference", 20)
    assert artifacts(workdir, "control-tuned")["model.safetensors"] != reference["model.safetensors"]
