"""The baseline is decoded once per task; a family's baseline on its first N examples, read from
that decode, is what decoding the baseline in the family gives: the same predictions and the same
executed compute, for every N (a whole number of batches or not) and batch size."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from mmskip.data.formats import VQAExample
from mmskip.evaluation.baseline import load_baseline, write_baseline
from mmskip.evaluation.runner import ExampleSet, decode_point
from mmskip.tasks import get_task

WORDS = "what color shape is are the a of there how many red blue green cube sphere one two yes no ? :".split()
QUESTIONS = ["what color is the cube ?", "how many spheres are there ?", "is there a red cube ?",
             "what shape is the blue one ?", "are there two green spheres ?", "how many cubes ?",
             "is the sphere red ?", "what color is the sphere of the cube ?"]
MAX_NEW_TOKENS = 5


class TextModel:
    """The model seam's three members over text prompts alone (left-padded token embeddings)."""

    def __init__(self, llm, tokenizer):
        self.llm, self.tokenizer = llm, tokenizer

    @torch.no_grad()
    def prompt_batches(self, ex, batch_size):
        embed, batches = self.llm.get_input_embeddings(), []
        for s in range(0, len(ex.examples), batch_size):
            rows = ex.prompt_ids[s : s + batch_size]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
            batches.append((embed(ids), mask))
        return batches


@pytest.fixture(scope="module")
def model():
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    torch.manual_seed(0)
    llm = OPTForCausalLM(OPTConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                   num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2, init_std=0.3)).eval()
    return TextModel(llm, tokenizer)


def examples(model, n: int) -> ExampleSet:
    task = get_task("vqa")
    chosen = [VQAExample(i, i, q, "what", ("no",) * 10, "no") for i, q in enumerate(QUESTIONS[:n])]
    prompt_ids = model.tokenizer([f"{e.question} :" for e in chosen], add_special_tokens=False)["input_ids"]
    return ExampleSet(task, chosen, prompt_ids, [e.image_id for e in chosen], MAX_NEW_TOKENS)


@pytest.mark.parametrize("batch_size", [3, 4])
def test_a_family_baseline_read_from_the_one_decode_is_its_own_decode(tmp_path, model, batch_size):
    split = examples(model, len(QUESTIONS))
    metrics = write_baseline(model, split, batch_size, "test", tmp_path / "baseline")
    assert metrics["num_examples"] == len(QUESTIONS) and metrics["batch_size"] == batch_size
    for n in range(1, len(QUESTIONS) + 1):
        ex = examples(model, n)
        decoded = decode_point(model, ex, batch_size, "baseline")
        for batches in (None, model.prompt_batches(ex, batch_size)):  # the tail built here, or the family's
            read = load_baseline(tmp_path / "baseline", model, ex, batch_size, batches)
            assert read.predictions == decoded.predictions
            assert json.dumps(read.stats.as_dict()) == json.dumps(decoded.stats.as_dict())
    assert len(set(decoded.predictions)) > 1  # the prompts lead to different answers


def test_a_baseline_of_other_examples_batch_size_or_token_limit_is_refused(tmp_path, model):
    write_baseline(model, examples(model, 6), 3, "test", tmp_path / "baseline")
    ex = examples(model, 4)
    with pytest.raises(ValueError, match=r"decoded with \{'task': 'vqa', 'batch_size': 3, 'max_new_tokens': 5\}; "
                                         r"this evaluation needs \{'task': 'vqa', 'batch_size': 2,"):
        load_baseline(tmp_path / "baseline", model, ex, 2)
    with pytest.raises(ValueError, match=r"examples \(6 of split 'test'\) do not start with these 8 examples"):
        load_baseline(tmp_path / "baseline", model, examples(model, 8), 3)
    shuffled = ExampleSet(ex.task, ex.examples[::-1], ex.prompt_ids[::-1], ex.image_ids[::-1], ex.max_new_tokens)
    with pytest.raises(ValueError, match=r"do not start with these 4 examples"):
        load_baseline(tmp_path / "baseline", model, shuffled, 3)
    with pytest.raises(ValueError, match=r"nowhere: no baseline decode \(metrics.json, predictions.json, "
                                         r"batches.json missing\); run `mmskip baseline`"):
        load_baseline(tmp_path / "nowhere", model, ex, 3)
