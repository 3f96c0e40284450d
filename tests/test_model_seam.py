"""The model seam: LLaVA-1.5 (a tiny random ``LlavaForConditionalGeneration`` saved like a hub
checkpoint) runs through the shared runner unchanged, token for token as Hugging Face generates."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoProcessor, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from mmskip.data.formats import VQAExample
from mmskip.evaluation.runner import ExampleSet, decode_point
from mmskip.models import LLAVA_TEMPLATE, LlavaModel
from mmskip.skipping.engine import SkipEngine
from mmskip.skipping.plan import SkipPlan
from mmskip.tasks import get_task

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
WORDS = ("USER ASSISTANT Question Answer : ? what color shape size is are the a an of there how many red blue green "
         "yellow cube sphere cylinder small large yes no one two three left right object objects in image").split()
IMAGE_SIZE, PATCH = 28, 14  # (28 / 14) ** 2 = 4 image tokens, the CLS feature dropped
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
MAX_NEW_TOKENS = 6
PROMPTS = SimpleNamespace(vqa_prompt="Question: {question} Answer:")
QUESTIONS = {1: (10, "what color is the cube?"), 2: (11, "how many objects are there in the image?"),
             3: (10, "is there a small red sphere left of the large blue cylinder?")}  # qid: (image, question)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation apart
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def tiny_llava(tokenizer, num_layers: int = 2) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=num_layers, intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id, initializer_range=0.5)
    # the large initialisation makes greedy outputs depend on the image and on every layer
    cfg = LlavaConfig(vision_config=vision, text_config=text, vision_feature_select_strategy="default",
                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # RMSNorm weights start at one, which would make every norm the same function
        for name, weight in model.model.language_model.named_parameters():
            if name.endswith("norm.weight"):
                weight.uniform_(0.5, 1.5)
    return model


def images() -> dict:
    """image id -> an (H, W, 3) uint8 array of its own size (the processor resizes and crops)."""
    rng = np.random.default_rng(0)
    return {i: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for i, (h, w) in {10: (32, 40), 11: (30, 28)}.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A folder laid out like llava-hf/llava-1.5-*-hf, and the model it was saved from."""
    path = tmp_path_factory.mktemp("llava")
    tokenizer = tiny_tokenizer()
    model = tiny_llava(tokenizer)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model


def example_set(tokenizer) -> ExampleSet:
    task = get_task("vqa")
    examples = [VQAExample(qid, image, question, "what", ("no",) * 10, "no")
                for qid, (image, question) in QUESTIONS.items()]
    prompt_ids = tokenizer([task.prompt(PROMPTS, e) for e in examples], add_special_tokens=False)["input_ids"]
    return ExampleSet(task, examples, prompt_ids, [e.image_id for e in examples], MAX_NEW_TOKENS)


def hf_generate(checkpoint, ex, batch_size):
    """New tokens of ``LlavaForConditionalGeneration.generate`` per batch, the inputs made by the
    checkpoint's own processor from the prompt texts (not through LlavaModel)."""
    path, model = checkpoint
    processor = AutoProcessor.from_pretrained(path)
    tok, imgs, out = processor.tokenizer, images(), []
    texts = [LLAVA_TEMPLATE.format(prompt=ex.task.prompt(PROMPTS, e)) for e in ex.examples]
    for s in range(0, len(texts), batch_size):
        enc = processor(images=[imgs[i] for i in ex.image_ids[s : s + batch_size]], text=texts[s : s + batch_size],
                        padding=True, padding_side="left", return_tensors="pt")
        assert int((enc["input_ids"] == model.config.image_token_id).sum(1).min()) == IMAGE_TOKENS
        tokens = model.generate(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"],
                                attention_mask=enc["attention_mask"], do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out.append(tokens[:, enc["input_ids"].shape[1]:])
    return out


def test_runner_reproduces_llava_generate_token_for_token(checkpoint):
    path, _ = checkpoint
    model = LlavaModel.from_pretrained(path, images(), device="cpu", dtype=torch.float32)
    ex = example_set(model.tokenizer)
    expected = hf_generate(checkpoint, ex, batch_size=2)
    assert len({t for batch in expected for t in batch.flatten().tolist()}) > 2  # not one repeated token
    # the token ids: the engine on the seam's batches
    engine = SkipEngine(model.llm)
    got = [engine.generate(mask, inputs_embeds=embeds, max_new_tokens=MAX_NEW_TOKENS,
                           eos_token_id=model.tokenizer.eos_token_id, pad_token_id=model.tokenizer.pad_token_id)
           for embeds, mask in model.prompt_batches(ex, 2)]
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
    # the predictions: the shared runner, unchanged
    run = decode_point(model, ex, 2, "ref")
    texts = [t.strip() for batch in expected for t in model.tokenizer.batch_decode(batch, skip_special_tokens=True)]
    assert run.predictions == texts
    assert run.stats.fraction("decode") == 1.0


def test_prompt_batches_are_left_padded_with_the_image_merged(checkpoint):
    path, reference = checkpoint
    model = LlavaModel.from_pretrained(path, images())
    ex = example_set(model.tokenizer)
    (embeds, mask), (embeds_last, mask_last) = model.prompt_batches(ex, 2)
    assert embeds.shape[:2] == mask.shape and embeds.shape[0] == 2 and embeds_last.shape[0] == 1
    assert bool(mask[:, -1].all()) and not bool(mask.all())  # left padding: the shorter prompt starts later
    enc = model.inputs(ex.prompt_ids[:2], ex.image_ids[:2])
    text_embeds = reference.get_input_embeddings()(enc["input_ids"])
    image = enc["input_ids"] == reference.config.image_token_id
    assert torch.equal(embeds[~image], text_embeds[~image])  # text positions: the token embeddings
    assert not torch.allclose(embeds[image], text_embeds[image])  # image positions: the projected features
    features = reference.get_image_features(pixel_values=enc["pixel_values"], return_dict=True).pooler_output
    assert torch.allclose(embeds[image], torch.cat(features).reshape(-1, embeds.shape[-1]))


def test_skip_plan_runs_through_the_runner_and_executes_less(checkpoint):
    path, _ = checkpoint
    model = LlavaModel.from_pretrained(path, images())
    ex = example_set(model.tokenizer)
    batches = model.prompt_batches(ex, 2)
    ref = decode_point(model, ex, 2, "ref", batches=batches)
    skipped = decode_point(model, ex, 2, "skip", SkipPlan("skip_block", (1,), "generated"), batches=batches)
    assert len(skipped.predictions) == len(ex.examples)
    assert skipped.stats.fraction("prefill") == ref.stats.fraction("prefill") == 1.0  # scope: generated only
    assert ref.stats.fraction("decode") == 1.0
    assert skipped.stats.fraction("decode") < 1.0
    assert skipped.stats.depth_fraction("decode") < ref.stats.depth_fraction("decode") == 1.0
    per_token = lambda run: sum(run.stats.per_token("decode").values())  # noqa: E731
    assert per_token(skipped) < per_token(ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "bfloat16"])
def test_loading_puts_every_parameter_on_the_device_in_the_dtype(checkpoint, dtype):
    path, _ = checkpoint
    model = LlavaModel.from_pretrained(path, images(), device="cpu", dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    params = dict(model.llm.named_parameters())
    assert {p.dtype for p in params.values()} == {want}
    assert {p.device for p in params.values()} == {torch.device("cpu")}
    assert not any(p.requires_grad for p in params.values())
    ex = example_set(model.tokenizer)
    embeds, mask = model.prompt_batches(ex, 2)[0]
    assert embeds.dtype == want and embeds.device == mask.device == torch.device("cpu")
    assert len(decode_point(model, ex, 2, "ref").predictions) == len(ex.examples)


def test_bad_device_or_dtype_is_named(checkpoint):
    path, _ = checkpoint
    with pytest.raises(ValueError, match=r"device='cpux'"):
        LlavaModel.from_pretrained(path, images(), device="cpux")
    with pytest.raises(ValueError, match=r"dtype=torch\.int8: allowed"):
        LlavaModel.from_pretrained(path, images(), dtype=torch.int8)
    with pytest.raises(ValueError, match=r"dtype='fp33': allowed"):
        LlavaModel.from_pretrained(path, images(), dtype="fp33")


def test_template_needs_the_prompt_and_one_image_token(checkpoint):
    path, _ = checkpoint
    with pytest.raises(ValueError, match="needs '{prompt}' and one '<image>'"):
        LlavaModel.from_pretrained(path, images(), template="USER: {prompt} ASSISTANT:")


def test_predictions_depend_on_the_image(checkpoint):
    path, _ = checkpoint
    model = LlavaModel.from_pretrained(path, images())
    ex = example_set(model.tokenizer)
    swapped = images()
    swapped[10], swapped[11] = swapped[11], swapped[10]
    other = LlavaModel(model.llm, model.processor, swapped)
    assert decode_point(other, ex, 2, "swapped").predictions != decode_point(model, ex, 2, "ref").predictions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_tensor_follows_the_model_to_the_gpu(checkpoint):
    path, _ = checkpoint
    model = LlavaModel.from_pretrained(path, images(), device="cuda", dtype=torch.bfloat16)
    assert {p.device.type for p in model.llm.parameters()} == {"cuda"}
    ex = example_set(model.tokenizer)
    batches = model.prompt_batches(ex, 2)
    assert {t.device.type for batch in batches for t in batch} == {"cuda"}
    run = decode_point(model, ex, 2, "skip", SkipPlan("skip_block", (1,), "generated"), batches=batches)
    assert len(run.predictions) == len(ex.examples) and run.stats.fraction("decode") < 1.0
