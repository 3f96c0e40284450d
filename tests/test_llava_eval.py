"""LLaVA-1.5 without training (``mmskip evaluate_llava``): the skip grid of every mode on a
prepared COCO folder's images, with a tiny random ``LlavaForConditionalGeneration`` saved like the
llava-hf checkpoints (and under the hub id in the hub's cache layout). The unskipped decode equals
Hugging Face ``generate`` token for token; a skipped block equals the model without that block."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_coco import vqa, write
from test_hub import COMMIT
from test_model_seam import IMAGE_SIZE, PATCH, PROMPTS, tiny_llava, tiny_tokenizer
from test_skipping_llava import without_layers
from transformers import AutoProcessor, CLIPImageProcessor, LlavaProcessor

from mmskip.cli import main
from mmskip.data.coco import prepare_coco
from mmskip.evaluation.llava import evaluate_llava
from mmskip.foundation.hub import MissingModelError
from mmskip.models import LLAVA_TEMPLATE
from mmskip.params import EvaluationConfig, PromptsConfig, SkippingConfig
from mmskip.report.skipping import LLAVA_FAMILY, llava_run_cells, read_llava_runs, skip_rows
from mmskip.tasks import get_task

HUB_ID = "llava-hf/llava-1.5-7b-hf"
TEST_IMAGES = {3: (32, 40), 4: (30, 28), 6: (28, 36)}  # cocoid: (height, width) of the test split's images
MODES = ("skip_block", "skip_ffn", "parallel_attn_ffn", "drop_last")


def grid(**kw):
    """Every layer-0 plan of a 2-layer LM: interval 2 from start -1 skips layer 0 alone."""
    values = dict(modes=MODES, scopes=("generated", "all"), intervals=(2,), start_layers=(-1,), drop_last=(1,),
                  semantics=("textbook",), vqa_questions=0, caption_images=0)
    return SkippingConfig(**{**values, **kw})


EVALUATION = EvaluationConfig(split="test", batch_size=2, vqa_max_new_tokens=5, caption_max_new_tokens=6)


def save_tiny_llava(path, num_layers: int = 2):
    """A tiny LlavaForConditionalGeneration and its processor saved in ``path`` as llava-hf/llava-1.5-7b-hf
    lays them out; returns the model."""
    tokenizer = tiny_tokenizer()
    model = tiny_llava(tokenizer, num_layers)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                                                  crop_size={"height": IMAGE_SIZE,
                                                                             "width": IMAGE_SIZE}),
                               tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A folder laid out like llava-hf/llava-1.5-7b-hf, and the model it was saved from."""
    path = tmp_path_factory.mktemp("llava")
    return path, save_tiny_llava(path)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO folder made by prepare_coco from files in the published formats, with its images."""
    src = tmp_path_factory.mktemp("coco_src")
    images = [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "split": "test",
               "imgid": i, "sentids": [i], "sentences": [{"raw": "a red cube", "tokens": [], "sentid": i, "imgid": i}]}
              for i in TEST_IMAGES]
    images.append({"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "cocoid": 9,
                   "split": "train", "imgid": 9, "sentids": [9],
                   "sentences": [{"raw": "a blue sphere", "tokens": [], "sentid": 9, "imgid": 9}]})
    karpathy = write(src / "dataset_coco.json", {"dataset": "coco", "images": images})
    questions, annotations = vqa([(30, 3), (31, 3), (40, 4), (60, 6), (61, 6)])
    for q, text in zip(questions["questions"], ["what color is the cube ?", "how many objects are there ?",
                                                 "is there a small red sphere ?", "what shape is the large object ?",
                                                 "are there two cubes ?"]):
        q["question"] = text
    out = src.parent / "coco"
    prepare_coco(karpathy, [write(src / "q.json", questions)], [write(src / "a.json", annotations)], out)
    rng = np.random.default_rng(0)
    for image in images:
        h, w = TEST_IMAGES.get(image["cocoid"], (30, 30))
        file = out / "images" / image["filepath"] / image["filename"]
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(file, quality=95)
    return out


def reference(model_path, model, coco, task, max_new_tokens, batch_size=2):
    """Answers of ``model.generate`` (greedy) on the test split, inputs made by the checkpoint's own
    processor from the prompt texts and the image files (not through mmskip's LLaVA code)."""
    spec = get_task(task)
    examples = spec.examples(coco, "test")
    files = {i["id"]: coco / "images" / i["file_name"]
             for i in json.loads((coco / "annotations" / "captions_test.json").read_text())["images"]}
    processor = AutoProcessor.from_pretrained(model_path)
    tok, answers = processor.tokenizer, []
    for s in range(0, len(examples), batch_size):
        batch = examples[s : s + batch_size]
        enc = processor(images=[Image.open(files[e.image_id]).convert("RGB") for e in batch],
                        text=[LLAVA_TEMPLATE.format(prompt=spec.prompt(PROMPTS_ALL, e)) for e in batch],
                        padding=True, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        answers += [t.strip() for t in tok.batch_decode(tokens[:, enc["input_ids"].shape[1]:],
                                                        skip_special_tokens=True)]
    return answers


PROMPTS_ALL = PromptsConfig(vqa_prompt=PROMPTS.vqa_prompt, caption_prompt="what is in the image ?")


@pytest.mark.parametrize("task, max_new_tokens", [("vqa", 5), ("caption", 6)])
def test_grid_unskipped_equals_generate_and_a_skipped_block_equals_the_model_without_it(checkpoint, coco, tmp_path,
                                                                                       task, max_new_tokens):
    path, model = checkpoint
    out = tmp_path / "llava" / task
    run = evaluate_llava(task, coco, str(path), out, PROMPTS_ALL, grid(), EVALUATION, device="cpu", dtype="float32",
                         check=3)
    n = 5 if task == "vqa" else 3
    assert run["num_examples"] == n and run["num_layers"] == 2 and run["modes"] == list(MODES)
    assert run["check_generate"] == {"examples": 3, "equal": 3}
    assert run["model"] == {"path": str(path)} and run["dtype"] == "float32"
    assert sorted(p.name for p in out.iterdir()) == sorted([*MODES, "run.json"])

    expected = reference(path, model, coco, task, max_new_tokens)
    assert len(set(expected)) > 1  # the answers depend on the image and question
    without_first = reference(path, without_layers(model, (0,)), coco, task, max_new_tokens)
    assert without_first != expected
    for mode in MODES:
        metrics = json.loads((out / mode / "metrics.json").read_text())
        predictions = json.loads((out / mode / "predictions.json").read_text())
        assert metrics["points"][0]["key"] == "baseline" and metrics["num_examples"] == n
        assert predictions["predictions"]["baseline"] == expected
        assert metrics["points"][0]["decode_flops_fraction"] == 1.0
        for point in metrics["points"][1:]:  # running SA and FFN side by side saves depth, not FLOPs
            fraction = "decode_depth_fraction" if mode == "parallel_attn_ffn" else "decode_flops_fraction"
            assert point[fraction] < 1.0, point["key"]
        assert json.loads((out / mode / "timing.json").read_text())["batch_size"] == 2
    skip_block = json.loads((out / "skip_block" / "predictions.json").read_text())["predictions"]
    assert skip_block["skip_block-all-k2-s-1"] == without_first  # layer 0 skipped for every token
    drop = json.loads((out / "drop_last" / "predictions.json").read_text())["predictions"]
    assert drop["drop_last-1"] == reference(path, without_layers(model, (1,)), coco, task, max_new_tokens)
    # the report reads the folders as the default's grid: one row per point and metric, the baseline once
    runs, infos = read_llava_runs(out.parent)
    rows = skip_rows(runs, LLAVA_FAMILY)
    points = {mode: json.loads((out / mode / "metrics.json").read_text())["points"] for mode in MODES}
    assert infos == {task: run} and {r["family"] for r in rows} == {LLAVA_FAMILY}
    assert len({r["point"] for r in rows}) == 1 + sum(len(p) - 1 for p in points.values())
    assert llava_run_cells(run)["check"] == "3 of 3"


def test_a_hub_id_is_read_offline_from_the_cache_and_its_commit_recorded(checkpoint, coco, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, _ = checkpoint
    cache = tmp_path / "hub"
    root = cache / f"models--{HUB_ID.replace('/', '--')}"  # the hub cache's layout, as in test_hub.put_in_cache
    shutil.copytree(path, root / "snapshots" / COMMIT)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    run = evaluate_llava("vqa", coco, HUB_ID, tmp_path / "out", PROMPTS_ALL, grid(modes=("skip_block",)), EVALUATION,
                         revision="main", cache=cache, check=0)
    assert run["model"] == {"id": HUB_ID, "revision": "main", "commit": COMMIT}
    assert run["check_generate"] == {"examples": 0, "equal": 0}
    with pytest.raises(MissingModelError, match=f"mmskip fetch_model --id {HUB_ID} --revision v9"):
        evaluate_llava("vqa", coco, HUB_ID, tmp_path / "out2", PROMPTS_ALL, grid(), EVALUATION, revision="v9",
                       cache=cache)
    assert not (tmp_path / "out2").exists()


def test_missing_images_are_listed_before_the_model_loads(checkpoint, coco, tmp_path):
    path, _ = checkpoint
    broken = tmp_path / "coco"
    shutil.copytree(coco, broken)
    gone = broken / "images" / "val2014" / "COCO_val2014_000000000004.jpg"
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of the 3 images of split 'test' .* missing .*{gone}"):
        evaluate_llava("vqa", broken, str(path), tmp_path / "out", PROMPTS_ALL, grid(), EVALUATION)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw, message", [
    (dict(start_layers=(1,)), r"skipping.start_layers=\[1\]: \[1\] leave no layer to skip in a 2-layer LLM"),
    (dict(drop_last=(2,)), r"skipping.drop_last=\[2\]: \[2\] not below the 2 layers"),
])
def test_a_grid_the_checkpoint_cannot_run_is_refused_before_loading(checkpoint, coco, tmp_path, kw, message):
    path, _ = checkpoint
    with pytest.raises(ValueError, match=message):
        evaluate_llava("vqa", coco, str(path), tmp_path / "out", PROMPTS_ALL, grid(**kw), EVALUATION)
    assert not (tmp_path / "out").exists()


def test_the_command_runs_the_grid_and_names_bad_values(checkpoint, coco, tmp_path, capsys):
    path, _ = checkpoint
    out = tmp_path / "out"
    main(["evaluate_llava", "--task", "caption", "--data", str(coco), "--model", str(path), "--out", str(out),
          "--threads", "1", "--modes", "skip_attn", "--scopes", "generated", "--intervals", "2", "--start_layers",
          "-1", "--semantics", "official", "--caption_images", "2", "--batch_size", "2",
          "--caption_prompt", "what is in the image ?", "--check_generate", "2"])
    run = json.loads((out / "run.json").read_text())
    assert run["num_examples"] == 2 and run["modes"] == ["skip_attn"] and run["check_generate"]["equal"] == 2
    keys = [p["key"] for p in json.loads((out / "skip_attn" / "metrics.json").read_text())["points"]]
    assert keys[0] == "baseline" and all(k.endswith("-official") for k in keys[1:])
    for flags, message in [(["--device", "tpu9"], "device='tpu9'"), (["--model", str(tmp_path)], "no config.json"),
                           (["--check_generate", "-1"], "check_generate=-1")]:
        args = ["evaluate_llava", "--task", "vqa", "--data", str(coco), "--model", str(path), "--out",
                str(tmp_path / "bad"), *flags]
        with pytest.raises(SystemExit, match=message):
            main(args)
        assert not (tmp_path / "bad").exists()
