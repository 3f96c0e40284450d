"""Hub models by id and revision, read offline from a cache in Hugging Face's layout: tiny
checkpoints of the real classes saved under the paper's model ids load through the same code path
as real ones; a missing model stops with the id, the revision and the command that fetches it."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, OPTConfig,
                          OPTForCausalLM, PreTrainedTokenizerFast)

from mmskip.foundation.hub import MissingModelError, fetch_command, resolve
from mmskip.models import load_llm

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tokenizer():
    words = ["<unk>", "<s>", "</s>", "<pad>", "a", "red", "cube"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def put_in_cache(cache, repo_id, model, tok=None, branch="main"):
    """``model`` saved as the hub cache holds a download of ``repo_id`` at COMMIT (``branch`` -> COMMIT)."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    model.save_pretrained(snapshot)
    if tok is not None:
        tok.save_pretrained(snapshot)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / branch).write_text(COMMIT)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a compute node
    torch.manual_seed(0)
    cache = tmp_path / "hub"
    tok = tokenizer()
    put_in_cache(cache, "facebook/opt-2.7b", OPTForCausalLM(OPTConfig(
        vocab_size=7, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        word_embed_proj_dim=16, pad_token_id=3, bos_token_id=1, eos_token_id=2)), tok)
    put_in_cache(cache, "lmsys/vicuna-7b-v1.5", LlamaForCausalLM(LlamaConfig(
        vocab_size=7, hidden_size=16, num_hidden_layers=2, intermediate_size=32, num_attention_heads=2,
        pad_token_id=3, bos_token_id=1, eos_token_id=2)), tok)
    put_in_cache(cache, "openai/clip-vit-large-patch14", CLIPVisionModel(CLIPVisionConfig(
        image_size=28, patch_size=14, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2)))
    return cache


@pytest.mark.parametrize("repo_id, cls", [("facebook/opt-2.7b", OPTForCausalLM),
                                          ("lmsys/vicuna-7b-v1.5", LlamaForCausalLM)])
@pytest.mark.parametrize("revision", [COMMIT, "main"])
def test_a_cached_hub_llm_loads_offline_through_the_model_seam(cache, repo_id, cls, revision):
    path = resolve(repo_id, revision, cache)
    assert path.name == COMMIT and path.parent.parent.name == f"models--{repo_id.replace('/', '--')}"
    model, tok = load_llm(path)
    assert type(model) is cls and not model.training and tok.pad_token == "<pad>"


def test_a_cached_hub_encoder_resolves_like_the_llms(cache):
    model = CLIPVisionModel.from_pretrained(resolve("openai/clip-vit-large-patch14", COMMIT, cache))
    assert model.config.hidden_size == 16


@pytest.mark.parametrize("repo_id, revision", [("facebook/opt-6.7b", "main"),  # not fetched
                                               ("facebook/opt-2.7b", "f" * 40),  # fetched, another commit
                                               ("facebook/opt-2.7b", "v1.0")])  # a tag the cache never saw
def test_a_missing_model_stops_with_its_id_revision_and_the_fetch_command(cache, repo_id, revision):
    with pytest.raises(MissingModelError) as err:
        resolve(repo_id, revision, cache)
    message = str(err.value)
    assert f"model {repo_id} at revision {revision} is not in the cache {cache}" in message
    assert fetch_command(repo_id, revision, cache) in message
    assert f"mmskip fetch_model --id {repo_id} --revision {revision} --cache {cache}" in message


@pytest.mark.parametrize("bad", ["opt-2.7b", "../etc/passwd", "facebook/../x", "a/b/c", ""])
def test_bad_model_ids_are_refused(cache, bad):
    with pytest.raises(ValueError, match="allowed an 'organisation/name' hub id"):
        resolve(bad, "main", cache)


# --- reference folders: the pipeline's fetch_model stage -------------------------------------------

SHAPE = {"num_layers": 2, "hidden_size": 16, "num_heads": 2, "ffn_dim": 32}  # the tiny OPT of ``cache``


def test_a_reference_folder_names_the_commit_and_loads_offline_through_the_model_seam(cache, tmp_path):
    from mmskip.foundation.hub import checkpoint, link

    out = tmp_path / "models" / "llm"
    reference = link("facebook/opt-2.7b", "main", cache, out, SHAPE, fetch_missing=False)
    assert reference == {"id": "facebook/opt-2.7b", "revision": "main", "commit": COMMIT, "cache": str(cache)}
    assert sorted(p.name for p in out.iterdir()) == ["hub.json"]
    assert checkpoint(out) == resolve("facebook/opt-2.7b", COMMIT, cache)
    model, tok = load_llm(out)  # the path every stage is given: models/llm
    assert type(model) is OPTForCausalLM and model.config.num_hidden_layers == 2 and tok.pad_token == "<pad>"
    assert checkpoint(tmp_path / "any-folder") == tmp_path / "any-folder"  # a checkpoint folder is itself


def test_a_shape_that_differs_from_the_checkpoint_is_refused_naming_each_key_and_nothing_is_written(cache, tmp_path):
    from mmskip.cli import main

    out = tmp_path / "models" / "llm"
    with pytest.raises(SystemExit) as err:
        main(["fetch_model", "--id", "lmsys/vicuna-7b-v1.5", "--revision", "main", "--cache", str(cache),
              "--out", str(out), "--num_layers", "32", "--hidden_size", "16", "--ffn_dim", "11008"])
    message = str(err.value)
    assert message.startswith("mmskip fetch_model: model lmsys/vicuna-7b-v1.5 at main (")
    assert message.split("set the section to the checkpoint's:\n")[1].splitlines() == [
        "  - num_layers = 32 in params, but the checkpoint's num_hidden_layers is 2",
        "  - ffn_dim = 11008 in params, but the checkpoint's intermediate_size is 32"]  # hidden_size 16 agrees
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # nothing written, no temporary left


def test_a_job_whose_referenced_model_left_the_cache_stops_with_the_id_commit_and_fetch_command(cache, tmp_path):
    import shutil

    from mmskip.foundation.hub import link

    out = tmp_path / "models" / "llm"
    link("facebook/opt-2.7b", "main", cache, out, fetch_missing=False)
    shutil.rmtree(cache / "models--facebook--opt-2.7b")
    with pytest.raises(MissingModelError) as err:
        load_llm(out)
    assert f"model facebook/opt-2.7b at revision {COMMIT} is not in the cache {cache}" in str(err.value)
    assert f"mmskip fetch_model --id facebook/opt-2.7b --revision {COMMIT} --cache {cache}" in str(err.value)


def test_a_fetch_skips_other_frameworks_weights_and_pickles_that_safetensors_duplicate():
    from mmskip.foundation.hub import FOREIGN_WEIGHTS, PICKLED_WEIGHTS, skipped_files

    both = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"]
    assert skipped_files(both) == [*FOREIGN_WEIGHTS, *PICKLED_WEIGHTS]
    assert "*.h5" in FOREIGN_WEIGHTS and "*.msgpack" in FOREIGN_WEIGHTS and "*.bin" in PICKLED_WEIGHTS
    only_pickles = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"]
    assert skipped_files(only_pickles) == list(FOREIGN_WEIGHTS)  # then the .bin files are the weights
