"""Paper scale through the real Snakefile, offline: a "paper-mini" config (configs/paper/clip-opt-2.7b.yaml
with tiny sizes) selected by --configfile. The fetch_data stage downloads COCO-shaped archives (Karpathy's
split, COCO 2014's image zips, VQAv2's four zips; OK-VQA's, GQA's, MSR-VTT's zip of MPEG-4 videos, and Clotho's
CSVs and 7z archives of WAV clips) from a loopback server through a source catalog; the fetch_model stage finds
tiny checkpoints of the real classes (OPTForCausalLM, CLIPVisionModel, TimesformerModel, ASTModel) under the
paper's hub ids in a hub cache, with no network; every later job loads them offline; the run ends in
reports/all.html. Also: every shipped paper config plans its whole DAG with no model or dataset present,
and `mmskip use_config` gives DVC the same switch."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (ASTConfig, ASTFeatureExtractor, ASTModel, CLIPImageProcessor, CLIPVisionConfig,
                          CLIPVisionModel, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast, TimesformerConfig,
                          TimesformerModel, VideoMAEImageProcessor)

from mmskip.params import merged
from mmskip.stages import stage_table
from test_download import Server, make_7z
from test_hub import COMMIT, put_in_cache
from test_pipeline_smoke import SMOKE
from workflow_utils import BIN, IMAGE_TASKS, REPO, check, copy_workflow, job_counts, read_params, run

pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")

PAPER_CONFIGS = sorted((REPO / "configs" / "paper").glob("*.yaml"))
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SIZES = {"big": 12, "small": 5}  # half the side of the square, on a 32-pixel grey image
# Karpathy split of the mini COCO: (split, count); train and restval images are in train2014, val and test in val2014
SPLITS = [("train", 20), ("restval", 6), ("val", 6), ("test", 10)]
WORDS = ["<unk>", "<s>", "</s>", "<pad>", "Question", "Answer", "Caption", ":", "?", "what", "color", "is", "the",
         "square", "a", "on", "grey", "yes", "no", "tone", "high", "low", "loud", "quiet", *COLORS, *SIZES]
TINY_LLM = {"hidden_size": 16, "num_layers": 4, "num_heads": 2, "ffn_dim": 32, "max_positions": 128}
TINY_LLM_SMALL = {"hidden_size": 8, "num_layers": 2, "num_heads": 2, "ffn_dim": 16, "max_positions": 128}
HUB_IDS = {"llm": "facebook/opt-2.7b", "llm_small": "facebook/opt-1.3b", "encoder": "openai/clip-vit-large-patch14",
           "video_encoder": "facebook/timesformer-base-finetuned-k600",
           "audio_encoder": "MIT/ast-finetuned-audioset-10-10-0.4593"}
# the published file names of the sources (mmskip.data.sources), each zip with the member the pipeline reads
ARCHIVES = {
    "karpathy_splits": "caption_datasets.zip", "coco_train2014": "train2014.zip", "coco_val2014": "val2014.zip",
    "vqav2_questions_train": "v2_Questions_Train_mscoco.zip", "vqav2_questions_val": "v2_Questions_Val_mscoco.zip",
    "vqav2_annotations_train": "v2_Annotations_Train_mscoco.zip",
    "vqav2_annotations_val": "v2_Annotations_Val_mscoco.zip"}
OWN_ARCHIVES = {  # OK-VQA's four zips (its questions ask about COCO's images) and GQA's two
    "okvqa_questions_train": "OpenEnded_mscoco_train2014_questions.json.zip",
    "okvqa_questions_val": "OpenEnded_mscoco_val2014_questions.json.zip",
    "okvqa_annotations_train": "mscoco_train2014_annotations.json.zip",
    "okvqa_annotations_val": "mscoco_val2014_annotations.json.zip",
    "gqa_questions": "questions1.2.zip", "gqa_images": "images.zip", "msrvtt": "MSRVTT.zip",
    **{f"clotho_captions_{p}": f"clotho_captions_{p}.csv" for p in ("development", "validation", "evaluation")},
    **{f"clotho_audio_{p}": f"clotho_audio_{p}.7z" for p in ("development", "validation", "evaluation")}}
AUDIOCAPS_FILES = {f"audiocaps_captions_{split}": f"{split}.csv" for split in ("train", "val", "test")}
CLOTHO_PARTS = {"development": 16, "validation": 4, "evaluation": 6}  # clips per part (train, val, test)
MSRVTT_SPLITS = {"train": 12, "val": 3, "test": 5}  # videos per list of MSR-VTT's own split (the _full lists)


def mini_msrvtt(staging) -> dict[str, bytes]:
    """MSRVTT.zip as Frozen in Time publishes it: MSRVTT/annotation/MSR_VTT.json (three captions a video),
    MSRVTT/videos/all/video{N}.mp4 (10 s, 2 fps, 32 px: a square of a colour and size on grey) and the split lists
    under MSRVTT/high-quality/structured-symlinks."""
    from test_video import make_video

    members, annotations, number = {}, [], 0
    lists = {}
    for split, count in MSRVTT_SPLITS.items():
        lists[f"{split}_list_full.txt"] = []
        for _ in range(count):
            video = f"video{number * 3}"  # MSR-VTT's ids are not contiguous within a split
            color, size = _of_image(number)
            make_video(staging / f"{video}.mp4", [_square_pixels(color, size)] * 20)
            members[f"MSRVTT/videos/all/{video}.mp4"] = (staging / f"{video}.mp4").read_bytes()
            annotations += [{"image_id": video, "caption": c, "id": len(annotations) + i} for i, c in enumerate(
                (f"a {size} {color} square", f"a {color} square", f"a {color} square on grey"))]
            lists[f"{split}_list_full.txt"].append(video)
            number += 1
    members["MSRVTT/annotation/MSR_VTT.json"] = json.dumps({"images": [], "annotations": annotations}).encode()
    for name, videos in lists.items():
        members[f"MSRVTT/high-quality/structured-symlinks/{name}"] = "".join(f"{v}\n" for v in videos).encode()
    return _zipped({"msrvtt": members})
PITCHES, LOUDNESS = {"low": 220.0, "high": 1760.0}, {"quiet": 0.05, "loud": 0.5}


def mini_clotho(staging) -> dict[str, bytes]:
    """Clotho's three caption CSVs and three 7z archives ({part}/{name}.wav, 44.1 kHz 16-bit PCM as Clotho's): a
    0.5 s tone of a pitch and a loudness per clip, five captions naming them."""
    import soundfile

    files, rng = {}, np.random.default_rng(2)
    for part, count in CLOTHO_PARTS.items():
        rows, members = [], []
        for n in range(count):
            pitch, loud = list(PITCHES)[n % 2], list(LOUDNESS)[(n // 2) % 2]
            t = np.arange(22050) / 44100
            wave = LOUDNESS[loud] * np.sin(2 * np.pi * PITCHES[pitch] * t) + 0.01 * rng.standard_normal(len(t))
            buffer = io.BytesIO()
            soundfile.write(buffer, wave.astype(np.float32), 44100, format="WAV", subtype="PCM_16")
            name = f"{part}_{n:03d}.wav"
            members.append((f"{part}/{name}", buffer.getvalue()))
            rows.append([name, f"a {pitch} tone", f"a {loud} {pitch} tone", f"a {pitch} {loud} tone",
                         f"a {loud} tone", f"a {pitch} tone"])
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([["file_name", *(f"caption_{i}" for i in range(1, 6))], *rows])
        files[f"clotho_captions_{part}"] = text.getvalue().encode()
        make_7z(staging / f"clotho_audio_{part}.7z", members)
        files[f"clotho_audio_{part}"] = (staging / f"clotho_audio_{part}.7z").read_bytes()
    return files


def _square_pixels(color: str, size: str, rng=None) -> np.ndarray:
    """(32, 32, 3) uint8: one square of that color and size on grey (noisy with ``rng``)."""
    pixels = np.full((32, 32, 3), 128, dtype=np.int16)
    if rng is not None:
        pixels += rng.integers(-10, 10, (32, 32, 3))
    half = SIZES[size]
    pixels[16 - half:16 + half, 16 - half:16 + half] = COLORS[color]
    return pixels.clip(0, 255).astype(np.uint8)


def _square(rng, color: str, size: str) -> bytes:
    """A JPEG of one square of that color and size on noisy grey."""
    buffer = io.BytesIO()
    Image.fromarray(_square_pixels(color, size, rng)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _zipped(members: dict[str, dict[str, bytes]]) -> dict[str, bytes]:
    """Each source's members as the bytes of one zip (fixed dates: the same bytes every time)."""
    archives = {}
    for source, content in members.items():
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for member, data in sorted(content.items()):
                archive.writestr(zipfile.ZipInfo(member, date_time=(2014, 1, 1, 0, 0, 0)), data)
        archives[source] = buffer.getvalue()
    return archives


def _of_image(cocoid: int) -> tuple[str, str]:
    return list(COLORS)[cocoid % len(COLORS)], list(SIZES)[(cocoid // len(COLORS)) % len(SIZES)]


def mini_coco() -> dict[str, bytes]:
    """The seven archives of a tiny COCO: images of one square, two captions each, two questions each."""
    rng = np.random.default_rng(0)
    images, files, questions, annotations = [], {"train2014": {}, "val2014": {}}, {"train": [], "val": []}, \
        {"train": [], "val": []}
    cocoid, sentid, qid = 1, 1, 1
    for split, count in SPLITS:
        folder = "train2014" if split in ("train", "restval") else "val2014"
        for _ in range(count):
            color, size = _of_image(cocoid)
            name = f"COCO_{folder}_{cocoid:012d}.jpg"
            files[folder][f"{folder}/{name}"] = _square(rng, color, size)
            captions = [f"a {size} {color} square", f"a {color} square on grey"]
            images.append({"filepath": folder, "filename": name, "cocoid": cocoid, "split": split,
                           "sentences": [{"raw": c, "sentid": sentid + i} for i, c in enumerate(captions)]})
            sentid += len(captions)
            part = folder[:-4]
            for question, answer, kind in (("what color is the square ?", color, "what color"),
                                           (f"is the square {size} ?", "yes", "is the")):
                questions[part].append({"image_id": cocoid, "question": question, "question_id": qid})
                annotations[part].append({"question_id": qid, "image_id": cocoid, "question_type": kind,
                                          "answer_type": "other", "multiple_choice_answer": answer,
                                          "answers": [{"answer": answer, "answer_id": i + 1} for i in range(10)]})
                qid += 1
            cocoid += 1
    members = {
        "karpathy_splits": {"dataset_coco.json": json.dumps({"images": images, "dataset": "coco"}).encode()},
        "coco_train2014": files["train2014"], "coco_val2014": files["val2014"]}
    for part in ("train", "val"):
        members[f"vqav2_questions_{part}"] = {f"v2_OpenEnded_mscoco_{part}2014_questions.json": json.dumps(
            {"questions": questions[part]}).encode()}
        members[f"vqav2_annotations_{part}"] = {f"v2_mscoco_{part}2014_annotations.json": json.dumps(
            {"annotations": annotations[part]}).encode()}
    return _zipped(members)


def mini_okvqa() -> dict[str, bytes]:
    """OK-VQA's four zips over the mini COCO's images: two questions per image, ten raw answers each and no
    multiple_choice_answer (OK-VQA's layout), each questions file naming its COCO folder as data_subtype."""
    members, qid, cocoid = {}, 5000, 1
    parts = {"train": [], "val": []}
    for split, count in SPLITS:
        parts["train" if split in ("train", "restval") else "val"] += range(cocoid, cocoid + count)
        cocoid += count
    for part, ids in parts.items():
        questions, annotations = [], []
        for image in ids:
            color, size = _of_image(image)
            for question, answer, kind in (("what color is the square ?", color, "eight"),
                                           (f"is the square {size} ?", "yes", "one")):
                questions.append({"image_id": image, "question": question, "question_id": qid})
                annotations.append({"image_id": image, "question_id": qid, "question_type": kind,
                                    "answer_type": "other", "confidence": 3,
                                    "answers": [{"answer_id": i + 1, "raw_answer": answer, "answer": answer,
                                                 "answer_confidence": "yes"} for i in range(10)]})
                qid += 1
        members[f"okvqa_questions_{part}"] = {f"OpenEnded_mscoco_{part}2014_questions.json": json.dumps(
            {"data_subtype": f"{part}2014", "questions": questions}).encode()}
        members[f"okvqa_annotations_{part}"] = {f"mscoco_{part}2014_annotations.json": json.dumps(
            {"annotations": annotations}).encode()}
    return _zipped(members)


def fill_hub_cache(cache):
    """Tiny checkpoints of the real classes, saved as the hub cache holds the paper's ids at COMMIT."""
    torch.manual_seed(0)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    for model, shape in (("llm", TINY_LLM), ("llm_small", TINY_LLM_SMALL)):
        put_in_cache(cache, HUB_IDS[model], OPTForCausalLM(OPTConfig(
            vocab_size=len(WORDS), hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_layers"],
            ffn_dim=shape["ffn_dim"], num_attention_heads=shape["num_heads"],
            max_position_embeddings=shape["max_positions"], word_embed_proj_dim=shape["hidden_size"],
            pad_token_id=3, bos_token_id=1, eos_token_id=2)), tokenizer)
    snapshot = put_in_cache(cache, HUB_IDS["encoder"], CLIPVisionModel(CLIPVisionConfig(
        image_size=28, patch_size=14, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2)))
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(snapshot)
    # TimeSformer over 8 frames of 32 px, 16 x 16 patches: CLS + 8 x 4 patches
    snapshot = put_in_cache(cache, HUB_IDS["video_encoder"], TimesformerModel(TimesformerConfig(
        image_size=32, patch_size=16, num_frames=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32)))
    VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(snapshot)
    # AST over 32 mel bins and 64 frames of 10 ms, 16 x 16 patches without overlap: 2 x 4 patches + 2 tokens
    snapshot = put_in_cache(cache, HUB_IDS["audio_encoder"], ASTModel(ASTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=16,
        frequency_stride=16, time_stride=16, max_length=64, num_mel_bins=32)))
    ASTFeatureExtractor(num_mel_bins=32, max_length=64).save_pretrained(snapshot)


# The tasks of datasets of their own: OK-VQA (on COCO's images), MSR-VTT (video, encoded by the TimeSformer) and
# Clotho (audio, encoded by the AST), each in its folder with its feature cache. COCO's Karpathy split and VQAv2 go
# through prepare_coco in LLaVA's run below, and the embedded default's two tasks through the smoke run. GQA (a
# second image task of its own dataset, its own images) is planned beside them below and its conversion tested in
# tests/test_coco.py: the run leaves it out for CI's time.
MINI_TASKS = ["okvqa", "msrvtt", "clotho"]
MINI_SOURCES = ("coco_train2014", "coco_val2014", *(s for s in OWN_ARCHIVES if not s.startswith("gqa")))


def paper_mini(catalog, cache) -> dict:
    """configs/paper/clip-opt-2.7b.yaml with the smoke test's sizes and tiny shapes, on the CPU, reading the
    test's catalog and hub cache."""
    config = yaml.safe_load((REPO / "configs" / "paper" / "clip-opt-2.7b.yaml").read_text(encoding="utf-8"))
    for section in ("features", "mapper", "evaluation", "skipping", "token_skipping", "pruning", "compression",
                    "train_compressed", "bench", "report"):
        config[section] = {**config.get(section, {}), **SMOKE[section]}
    config["runtime"] = {"device": "cpu", "dtype": "float32"}
    config["sources"].update(catalog=str(catalog), hub_cache=str(cache), audio_encoder=HUB_IDS["audio_encoder"],
                             video_encoder=HUB_IDS["video_encoder"])
    config["llm"], config["llm_small"] = dict(TINY_LLM), dict(TINY_LLM_SMALL)
    config["evaluation"]["num_beams"] = 1
    config["tasks"] = MINI_TASKS
    config["skipping"]["modes"] = ["skip_block"]  # one job per task: the other modes run in the smoke test
    config["token_skipping"]["kinds"] = ["early_exit"]  # calibrated on the validation split; the others: smoke test
    config["compression"]["mask_sets"] = ["wanda"]
    # one training variant, on the Wanda mask (the others, and the smaller LLM, run in the smoke test): the smaller
    # LLM's hub id is then neither fetched nor loaded
    config["train_compressed"]["variants"] = ["pruned"]
    return config


def serve(server, archives: dict[str, bytes], catalog):
    """``archives`` on the loopback ``server`` under their published names, and the catalog naming them there."""
    entries = {}
    for source, data in archives.items():
        name = {**ARCHIVES, **OWN_ARCHIVES, **AUDIOCAPS_FILES}[source]
        server.files[f"/{name}"] = data
        entries[source] = {"url": server.url(f"/{name}"), "md5": hashlib.md5(data).hexdigest()}
    catalog.write_text(yaml.safe_dump(entries), encoding="utf-8")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The paper-mini run: a workflow copy, the loopback server, the hub cache; `snakemake --cores 2
    --configfile paper-mini.yaml` run to reports/all.html, offline (HF_HUB_OFFLINE=1)."""
    root = tmp_path_factory.mktemp("paper-mini")
    path = copy_workflow(root / "wf")
    server = Server()
    (root / "7z").mkdir()
    archives = {**mini_coco(), **mini_okvqa(), **mini_clotho(root / "7z"),
                **mini_msrvtt(root / "7z")}
    serve(server, archives, root / "catalog.yaml")
    fill_hub_cache(root / "hub")
    (path / "paper-mini.yaml").write_text(yaml.safe_dump(paper_mini(root / "catalog.yaml", root / "hub")),
                                          encoding="utf-8")
    server.thread.start()
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf-home")}
    try:
        result = run([BIN / "snakemake", "--cores", "2", "--configfile", "paper-mini.yaml"], cwd=path,
                     timeout=1500, env=env)
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    check(result)
    return path, root, server, archives, result.stdout + result.stderr


def test_paper_mini_runs_from_downloads_and_hub_ids_to_the_report(mini):
    """OK-VQA, MSR-VTT and Clotho, each task on its own dataset folder and feature cache: downloaded, prepared,
    encoded (MSR-VTT's videos by the TimeSformer, Clotho's clips by the AST), trained on, evaluated, pruned (Wanda
    calibrated on each task's own inputs) and reported."""
    from mmskip.data.formats import read_captions, read_vqa, scenes_paths

    path, root, server, archives, output = mini
    counts = job_counts(output)
    assert counts["fetch_data"] == len(MINI_SOURCES) and counts["cache_features"] == len(MINI_TASKS)
    # no task reads COCO's Karpathy split or VQAv2: they are neither downloaded nor prepared
    assert counts["prepare_vqa"] == counts["prepare_msrvtt"] == counts["prepare_clotho"] == 1
    assert "prepare_coco" not in counts and "prepare_gqa" not in counts
    assert counts["fetch_model"] == len(HUB_IDS) - 1 and "pretrain_llm" not in counts  # not llm_small
    assert counts["train_compressed"] == len(MINI_TASKS)  # train_compressed.variants: pruned alone
    # early exit calibrates on each dataset's validation split; OK-VQA has none (its val2014 is the test split), so
    # its training split, and the records name the split
    calibrated = {t: json.loads((path / f"results/tokens/{t}/early_exit/metrics.json").read_text())
                  for t in MINI_TASKS}
    assert {t: m["calibration_split"] for t, m in calibrated.items()} == {"okvqa": "train", "msrvtt": "val",
                                                                         "clotho": "val"}
    assert all(m["same_as_baseline"] == m["num_examples"] for m in calibrated.values())
    # each archive requested once, hash-checked against the catalog's md5, then extracted whole
    names = {**ARCHIVES, **OWN_ARCHIVES}
    assert sorted(p for p, _ in server.log) == sorted(f"/{names[source]}" for source in MINI_SOURCES)
    for source in MINI_SOURCES:
        assert (path / "data/external/downloads" / names[source]).read_bytes() == archives[source]
    # OK-VQA asks about COCO's images (linked), its val is the test split
    okvqa = path / "data/okvqa"
    assert (okvqa / "images" / "val2014").resolve() == (path / "data/external/coco_val2014/val2014").resolve()
    questions = {}
    for task, folder, images in (("okvqa", okvqa, dict(SPLITS)["val"] + dict(SPLITS)["test"]),):
        test = scenes_paths(folder, "test")
        questions[task] = [e.question_id for e in read_vqa(test["vqa_questions"], test["vqa_annotations"])]
        assert len(questions[task]) == 2 * images
        index = json.loads((path / "results/features" / task / "index.json").read_text())
        assert index["splits"]["test"]["num_images"] == images
        assert index["splits"]["val"] == {"shards": [], "num_images": 0}  # no third split
    # Clotho: the extracted folders linked under audio/, development as train, evaluation as test, five captions
    # a clip; its clips encoded by the AST (2 x 4 patches and 2 tokens), the images by CLIP (4 patches and 1)
    clotho = path / "data/clotho"
    assert (clotho / "audio" / "evaluation").resolve() == (path / "data/external/clotho_audio_evaluation/"
                                                           "evaluation").resolve()
    for split, part in (("train", "development"), ("val", "validation"), ("test", "evaluation")):
        clips = read_captions(scenes_paths(clotho, split)["captions"])
        assert len(clips) == CLOTHO_PARTS[part] and {len(c.captions) for c in clips} == {5}
    questions["clotho"] = [c.image_id for c in read_captions(scenes_paths(clotho, "test")["captions"])]
    index = json.loads((path / "results/features/clotho/index.json").read_text())
    assert index["splits"]["test"] | {"shards": []} == {"shards": [], "num_images": 6, "tokens": 10, "dim": 16}
    # MSR-VTT: its own split's lists, the videos linked under videos/all, encoded by the TimeSformer
    msrvtt = path / "data/msrvtt"
    assert (msrvtt / "videos" / "all").resolve() == (path / "data/external/msrvtt/MSRVTT/videos/all").resolve()
    for split, count in MSRVTT_SPLITS.items():
        videos = read_captions(scenes_paths(msrvtt, split)["captions"])
        assert len(videos) == count and {len(v.captions) for v in videos} == {3}
    questions["msrvtt"] = [v.image_id for v in read_captions(scenes_paths(msrvtt, "test")["captions"])]
    index = json.loads((path / "results/features/msrvtt/index.json").read_text())
    assert index["splits"]["test"] | {"shards": []} == {"shards": [], "num_images": 5, "tokens": 33, "dim": 16}
    # the hub models: reference folders naming the commit, loaded offline by every job
    for model, repo_id in HUB_IDS.items():
        if model == "llm_small":  # no variant trains on it
            assert not (path / "models" / model).exists()
            continue
        assert json.loads((path / "models" / model / "hub.json").read_text()) == {
            "id": repo_id, "revision": "main", "commit": COMMIT, "cache": str(root / "hub")}
    for task, tokens in (("okvqa", 5), ("msrvtt", 33), ("clotho", 10)):
        mapper = json.loads((path / f"models/mapper/{task}/config.json").read_text())
        assert (mapper["llm_dim"], mapper["encoder_dim"], mapper["num_visual_tokens"]) == (16, 16, tokens)
    # each task decoded the first questions of its own dataset's test split
    for task in MINI_TASKS:
        baseline = json.loads((path / "results/baseline" / task / "predictions.json").read_text())
        assert baseline["ids"] == questions[task][:len(baseline["ids"])] and baseline["ids"]
    wanda = json.loads((path / "models/masks/wanda/prune.json").read_text())
    assert {e["task"] for e in wanda["entries"]} == set(MINI_TASKS)
    with open(path / "reports/summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    families = ("baseline", "blind", "skip", "tokens", "compress", "trained")
    assert {(r["task"], r["family"]) for r in rows} == {(t, f) for t in MINI_TASKS for f in families}
    assert {(r["task"], r["modality"]) for r in rows} == {("okvqa", "image"), ("msrvtt", "video"), ("clotho", "audio")}
    html = (path / "reports/all.html").read_text(encoding="utf-8")
    # the qualitative examples: each image task's images, MSR-VTT's frames, Clotho's clips as spectrograms
    assert html.count("data:image/png;base64,") >= 4 and 'alt="video ' in html and 'alt="clip ' in html
    assert not (path / "results/foundation").exists()  # nothing was pretrained
    # the lineage describes this run's stages (generated for the config), not dvc.yaml's embedded default
    lineage = json.loads((path / "reports/lineage.json").read_text())
    assert lineage["config"] == "generated for this run's config" and not lineage["dvc_lock"]
    names = {s["name"].split("@")[0] for s in lineage["stages"]}
    assert {"fetch_data", "prepare_vqa", "prepare_msrvtt", "prepare_clotho", "fetch_model"} <= names
    assert not {"make_scenes", "prepare_coco"} & names
    assert "has other stages than" in html
    # the report shows the config the run used (--configfile merged over params.yaml)
    assert "facebook/opt-2.7b" in html
    # done: nothing is left to run
    assert "Nothing to be done" in check(run([BIN / "snakemake", "-n", "--configfile", "paper-mini.yaml"],
                                             cwd=path)).stdout


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_each_paper_config_plans_its_whole_dag_with_nothing_present(config, tmp_path):
    """`snakemake -n` lists every job; SLURM is asked for a GPU by exactly the stages that run the LLM or the
    encoder (the configs run on cuda), and the downloads are local rules (they run on the login node)."""
    from test_runtime import GPU_STAGES
    from workflow_utils import _job_blocks

    path = copy_workflow(tmp_path / "wf")
    result = check(run([BIN / "snakemake", "-n", "--cores", "2", "--configfile", config], cwd=path))
    counts = job_counts(result.stdout)
    tasks = yaml.safe_load(config.read_text())["tasks"]  # every paper config names its tasks
    audio = "clotho" in tasks  # Clotho: its six files, its folder, the AST and its feature cache
    video = "msrvtt" in tasks  # MSR-VTT: its zip, its folder, the TimeSformer and its feature cache
    aqa = "clotho_aqa" in tasks  # Clotho-AQA: its clips' zip and three CSVs, its folder and feature cache (the AST)
    assert counts["fetch_data"] == len(ARCHIVES) + 6 * audio + video + 4 * aqa and counts["prepare_coco"] == 1
    assert not {"make_scenes", "train_tokenizer", "pretrain_llm", "pretrain_encoder"} & set(counts)
    if "llava" in config.stem:  # without training: the model, its grid per task, the report
        assert counts == {"fetch_data": len(ARCHIVES), "prepare_coco": 1, "fetch_model": 1,
                          "evaluate_llava": len(tasks), "report": 1, "all": 1}
    else:
        assert counts["fetch_model"] == 3 + (audio or aqa) + video
        assert counts["cache_features"] == 1 + audio + video + aqa
        prepared = (counts.get(f"prepare_{d}", 0) for d in ("clotho", "msrvtt", "clotho_aqa"))
        assert tuple(prepared) == (audio, video, aqa)
        assert counts["evaluate_skip"] == len(tasks)  # one job per task: every skip mode
    for name, block in _job_blocks(result.stdout + result.stderr):
        rule = name.split("@")[0]
        resources = re.search(r"^\s+resources: (.*)$", block, re.M)
        assert ("gpu=1" in (resources.group(1).split(", ") if resources else [])) == (rule in GPU_STAGES), name
    assert not (path / "data").exists() and not (path / "models").exists()
    table = stage_table(merged(read_params(REPO / "params.yaml"), yaml.safe_load(config.read_text())))
    assert {stage.name for stage in table if stage.local} == {"fetch_data", "fetch_model"}  # Snakemake localrules


LLAVA_ID = "llava-hf/llava-1.5-7b-hf"
TINY_LLAVA_LM = {"hidden_size": 32, "num_layers": 4, "num_heads": 4, "ffn_dim": 64, "max_positions": 128}


def test_the_llava_config_runs_without_training_from_the_hub_id_to_the_report(mini, tmp_path):
    """configs/paper/llava-1.5-7b.yaml, shrunk: the paper-mini run's downloaded COCO (copied: nothing is
    fetched again), a tiny LlavaForConditionalGeneration under LLaVA-1.5's hub id; fetch_model checks its
    language model against section llm, then evaluate_llava per task and the report, nothing trained."""
    from test_llava_eval import save_tiny_llava

    mini_path, *_ = mini
    path = copy_workflow(tmp_path / "wf")
    # COCO's image folders as the paper-mini run extracted them (modification times kept: up to date)
    for source in ("coco_train2014", "coco_val2014"):
        shutil.copytree(mini_path / "data/external" / source, path / "data/external" / source, symlinks=True)
    server = Server()  # the Karpathy split and VQAv2, which the paper-mini run's tasks did not read
    serve(server, mini_coco(), tmp_path / "catalog.yaml")
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{LLAVA_ID.replace('/', '--')}" / "snapshots" / COMMIT
    save_tiny_llava(snapshot, num_layers=TINY_LLAVA_LM["num_layers"])
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(COMMIT)
    config = yaml.safe_load((REPO / "configs" / "paper" / "llava-1.5-7b.yaml").read_text(encoding="utf-8"))
    config["runtime"] = {"device": "cpu", "dtype": "float32"}
    config["sources"].update(catalog=str(tmp_path / "catalog.yaml"), hub_cache=str(cache))
    config["evaluation"].update(batch_size=4, vqa_max_new_tokens=3, caption_max_new_tokens=5)
    config["skipping"].update(modes=["skip_block", "parallel_attn_ffn"], scopes=["generated"], intervals=[2],
                              vqa_questions=8, caption_images=4)
    wrong = {**config, "llm": {**TINY_LLAVA_LM, "ffn_dim": 11008}}
    (path / "wrong.yaml").write_text(yaml.safe_dump(wrong), encoding="utf-8")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    (path / "llava-mini.yaml").write_text(yaml.safe_dump({**config, "llm": TINY_LLAVA_LM}), encoding="utf-8")
    server.thread.start()
    try:
        # a section llm that is not the checkpoint's language model: fetch_model stops, naming the key
        result = run([BIN / "snakemake", "models/llava", "--cores", "2", "--configfile", "wrong.yaml"], cwd=path,
                     env=env)
        assert result.returncode != 0
        log = (path / "logs" / "fetch_model" / "llava.log").read_text(encoding="utf-8")
        assert "ffn_dim = 11008 in params, but the checkpoint's intermediate_size is 64" in log
        assert not (path / "models" / "llava").exists()
        output = check(run([BIN / "snakemake", "--cores", "2", "--configfile", "llava-mini.yaml"], cwd=path,
                           env=env))
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    counts = job_counts(output.stdout + output.stderr)
    assert counts == {"fetch_data": len(ARCHIVES) - 2, "prepare_coco": 1, "fetch_model": 1,
                      "evaluate_llava": len(IMAGE_TASKS), "report": 1, "all": 1}
    # COCO's Karpathy split, restval folded into train, and VQAv2 along its images, from the loopback server
    coco = path / "data/coco"
    assert (coco / "images" / "val2014").is_symlink()
    assert (coco / "images" / "val2014").resolve() == (path / "data/external/coco_val2014/val2014").resolve()
    test = json.loads((coco / "annotations" / "captions_test.json").read_text())
    assert len(test["images"]) == dict(SPLITS)["test"]
    train_q = json.loads((coco / "annotations" / "vqa_questions_train.json").read_text())["questions"]
    assert len(train_q) == 2 * (dict(SPLITS)["train"] + dict(SPLITS)["restval"])  # restval folded into train
    assert json.loads((path / "models" / "llava" / "hub.json").read_text()) == {
        "id": LLAVA_ID, "revision": "main", "commit": COMMIT, "cache": str(cache)}
    for task in IMAGE_TASKS:
        run_json = json.loads((path / "results" / "llava" / task / "run.json").read_text())
        assert run_json["model"] == {"id": LLAVA_ID, "revision": "main", "commit": COMMIT}
        assert run_json["num_layers"] == TINY_LLAVA_LM["num_layers"] and run_json["device"] == "cpu"
        assert run_json["check_generate"]["equal"] == run_json["check_generate"]["examples"] > 0
        assert run_json["modes"] == ["skip_block", "parallel_attn_ffn"]
    with open(path / "reports/summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {(r["task"], r["family"]) for r in rows} == {(t, "llava_skip") for t in IMAGE_TASKS}
    html = (path / "reports/all.html").read_text(encoding="utf-8")
    assert 'id="llava"' in html and f"{LLAVA_ID} @ main (commit {COMMIT})" in html
    assert "Nothing was trained in this run" in html and "<h3>Mapper training</h3>" not in html
    assert not {"mapper", "llm", "encoder"} & {p.name for p in (path / "models").iterdir()}
    lineage = json.loads((path / "reports/lineage.json").read_text())
    assert {s["name"].split("@")[0] for s in lineage["stages"]} == {
        "fetch_data", "prepare_coco", "fetch_model", "evaluate_llava", "report"}


AUDIOCAPS_CLIPS = {"train": 4, "val": 2, "test": 3}  # clips per CSV; one caption each in train, five in val, test


def mini_audiocaps(clips) -> dict[str, bytes]:
    """AudioCaps' three CSVs (audiocap_id, youtube_id, start_time, caption) and, in ``clips``, the user's files
    Y{youtube_id}.wav: a tone per clip, the last test clip missing (gone from YouTube)."""
    import soundfile

    clips.mkdir()
    files, audiocap_id = {}, 1
    for split, count in AUDIOCAPS_CLIPS.items():
        rows = [["audiocap_id", "youtube_id", "start_time", "caption"]]
        for n in range(count):
            youtube_id, pitch = f"{split}-{n:02d}x", list(PITCHES)[n % 2]
            for _ in range(1 if split == "train" else 5):
                rows.append([audiocap_id, youtube_id, 30, f"a {pitch} tone"])
                audiocap_id += 1
            if not (split == "test" and n == count - 1):
                t = np.arange(8000) / 16000
                soundfile.write(clips / f"Y{youtube_id}.wav", 0.3 * np.sin(2 * np.pi * PITCHES[pitch] * t), 16000)
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        files[f"audiocaps_captions_{split}"] = text.getvalue().encode()
    return files


def test_audiocaps_is_prepared_from_its_csvs_and_the_users_clips_and_encoded_by_the_ast(mini, tmp_path):
    """The audiocaps task's data: its CSVs downloaded from the loopback server, the user's folder of clips
    (params sources.audiocaps_audio) with a clip missing, prepare_audiocaps listing it, and the AST's feature cache
    (the paper-mini run's hub cache, its audio encoder already fetched)."""
    mini_path, root, *_ = mini
    server = Server()
    serve(server, mini_audiocaps(tmp_path / "clips"), tmp_path / "catalog.yaml")
    config = yaml.safe_load((mini_path / "paper-mini.yaml").read_text(encoding="utf-8"))
    config["tasks"] = ["audiocaps"]
    config["compression"]["mask_sets"] = ["wanda"]
    config["sources"].update(catalog=str(tmp_path / "catalog.yaml"), audiocaps_audio=str(tmp_path / "clips"),
                             audiocaps_clip_name="Y{youtube_id}.wav")
    (mini_path / "audiocaps.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    server.thread.start()
    try:
        output = check(run([BIN / "snakemake", "results/features/audiocaps", "--cores", "2", "--configfile",
                            "audiocaps.yaml"], cwd=mini_path, env={"HF_HUB_OFFLINE": "1",
                                                                   "HF_HOME": str(root / "hf-home")}))
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    counts = job_counts(output.stdout + output.stderr)
    assert counts == {"fetch_data": 3, "prepare_audiocaps": 1, "cache_features": 1}  # the AST is there already
    audiocaps = mini_path / "data/audiocaps"
    assert (audiocaps / "audio" / "clips").resolve() == (tmp_path / "clips").resolve()
    missing = json.loads((audiocaps / "annotations" / "missing_test.json").read_text())
    assert [m["youtube_id"] for m in missing["missing"]] == ["test-02x"]
    index = json.loads((mini_path / "results/features/audiocaps/index.json").read_text())
    assert {s: (v["num_images"], v["tokens"]) for s, v in index["splits"].items()} == {
        "train": (4, 10), "val": (2, 10), "test": (2, 10)}  # the test clip that is missing is not evaluated


def test_use_config_is_dvcs_configfile_and_refuses_a_bad_config_writing_nothing(tmp_path):
    path = copy_workflow(tmp_path / "wf")
    before = {name: (path / name).read_bytes() for name in ("params.yaml", "dvc.yaml")}
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [vqa, caption]\nsources:\n  data: coco\n  llm: facebook/opt-2.7b\n", encoding="utf-8")
    result = run([BIN / "mmskip", "use_config", bad], cwd=path)
    assert result.returncode != 0
    assert ("sources.data='coco', sources.llm_small='', sources.encoder='': sources.data 'coco' needs a hub id for "
            "llm_small, encoder") in result.stderr
    assert {name: (path / name).read_bytes() for name in before} == before

    config = REPO / "configs" / "paper" / "clip-opt-2.7b.yaml"
    check(run([BIN / "mmskip", "use_config", config], cwd=path))
    params = read_params(path / "params.yaml")
    wanted = yaml.safe_load(config.read_text(encoding="utf-8"))
    for section, values in wanted.items():  # the sections' keys, and the top-level tasks list
        assert ({k: params[section][k] for k in values} if isinstance(values, dict) else params[section]) == values, \
            section
    text = (path / "params.yaml").read_text(encoding="utf-8")
    assert "# Where the data and the foundation models come from." in text  # params.yaml's comments kept
    assert "intervals: [2, 3, 4]" in text  # lists as params.yaml writes them
    stages = yaml.safe_load((path / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert {"fetch_data", "prepare_coco", "fetch_model"} <= set(stages) and "make_scenes" not in stages
    check(run([BIN / "python", "-m", "mmskip.stages", "--check", "dvc.yaml"], cwd=path))


def test_tasks_of_their_own_datasets_plan_a_folder_and_a_feature_cache_each_alike_in_both_tools(tmp_path):
    """The three-modality paper config with OK-VQA, GQA, MSRVTT-QA and AudioCaps added: each dataset downloaded
    (COCO's images once, MSR-VTT's zip once), prepared and encoded into its own feature cache (MSR-VTT's and
    MSRVTT-QA's by the TimeSformer, Clotho's, Clotho-AQA's and AudioCaps' by the AST); each task's jobs read its
    dataset;
    Wanda, the benchmark and the report take one folder per task. DVC (after `mmskip use_config`) runs the same
    commands as Snakemake."""
    from workflow_utils import dvc_commands, dvc_init, snakemake_commands

    path = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((REPO / "configs" / "paper" / "clip-timesformer-ast-opt-2.7b.yaml").read_text(
        encoding="utf-8"))
    config["tasks"] = ["vqa", "okvqa", "gqa", "msrvtt", "msrvtt_qa", "clotho", "clotho_aqa", "audiocaps"]
    config["sources"].update(audiocaps_audio="/clips/audiocaps", audiocaps_clip_name="Y{youtube_id}.wav",
                             msrvtt_qa="/qa/msrvtt")
    (path / "five.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    dry = check(run([BIN / "snakemake", "-n", "--configfile", "five.yaml"], cwd=path))
    counts = job_counts(dry.stdout)
    # coco_train2014/val2014 and MSRVTT.zip fetched once; AudioCaps' three CSVs (its clips are the user's);
    # Clotho-AQA's zip and three CSVs (MSRVTT-QA's questions are the user's)
    assert counts["fetch_data"] == len(ARCHIVES) + len(OWN_ARCHIVES) + len(AUDIOCAPS_FILES) + 4
    assert (counts["prepare_coco"], counts["prepare_vqa"], counts["prepare_gqa"], counts["prepare_msrvtt"],
            counts["prepare_msrvtt_qa"], counts["prepare_clotho"], counts["prepare_clotho_aqa"],
            counts["prepare_audiocaps"], counts["cache_features"], counts["fetch_model"]) == (
        1, 1, 1, 1, 1, 1, 1, 1, 8, 5)
    assert counts["train_mapper"] == counts["evaluate_skip"] == counts["evaluate_compressed"] == 8
    check(run([BIN / "mmskip", "use_config", "five.yaml"], cwd=path))  # params.yaml and dvc.yaml for DVC
    commands = snakemake_commands(path)
    datasets = {"vqa": "coco", "okvqa": "okvqa", "gqa": "gqa", "msrvtt": "msrvtt", "msrvtt_qa": "msrvtt_qa",
                "clotho": "clotho", "clotho_aqa": "clotho_aqa", "audiocaps": "audiocaps"}
    for task, dataset in datasets.items():
        assert f" --scenes data/{dataset} --features results/features/{dataset} " in commands[f"train_mapper@{task}"]
        assert f" --scenes data/{dataset} " in commands[f"evaluate_skip@{task}"]
        encoder = {"msrvtt": "video_encoder", "msrvtt_qa": "video_encoder", "clotho": "audio_encoder",
                   "clotho_aqa": "audio_encoder", "audiocaps": "audio_encoder"}.get(task, "encoder")
        assert f"--encoder models/{encoder} --out results/features/{dataset} " in commands[f"cache_features@{dataset}"]
    order = ("coco", "okvqa", "gqa", "msrvtt", "msrvtt_qa", "clotho", "clotho_aqa", "audiocaps")
    per_task = (" --scenes " + " ".join(f"data/{d}" for d in order) + " --features "
                + " ".join(f"results/features/{d}" for d in order) + " ")
    assert per_task in commands["prune_wanda"] and per_task in commands["bench_skip"]
    assert " --scenes " + " ".join(f"data/{d}" for d in order) + " " in commands["report"]
    assert commands["prepare_msrvtt_qa"] == ("mmskip prepare_msrvtt_qa --root data/external/msrvtt/MSRVTT --msrvtt_qa "
                                             "/qa/msrvtt --out data/msrvtt_qa")
    assert commands["prepare_clotho_aqa"] == (
        "mmskip prepare_clotho_aqa --questions data/external/clotho_aqa_questions_train/clotho_aqa_train.csv "
        "data/external/clotho_aqa_questions_val/clotho_aqa_val.csv "
        "data/external/clotho_aqa_questions_test/clotho_aqa_test.csv --audio "
        "data/external/clotho_aqa_audio/audio_files --out data/clotho_aqa")
    assert (" --root data/external/msrvtt/MSRVTT --msrvtt_split full --out data/msrvtt"
            in commands["prepare_msrvtt"])
    assert commands["prepare_audiocaps"].startswith(
        "mmskip prepare_audiocaps --captions data/external/audiocaps_captions_train/train.csv "
        "data/external/audiocaps_captions_val/val.csv data/external/audiocaps_captions_test/test.csv "
        "--audiocaps_audio /clips/audiocaps --audiocaps_clip_name 'Y{youtube_id}.wav' --out data/audiocaps")
    assert (" --captions data/external/clotho_captions_development/clotho_captions_development.csv "
            "data/external/clotho_captions_validation/clotho_captions_validation.csv "
            "data/external/clotho_captions_evaluation/clotho_captions_evaluation.csv --audio "
            "data/external/clotho_audio_development/development data/external/clotho_audio_validation/validation "
            "data/external/clotho_audio_evaluation/evaluation --out data/clotho") in commands["prepare_clotho"]
    dvc_init(path)
    # an empty params value (sources.mirror, sources.catalog: the publisher's) is '' to Snakemake and nothing to
    # DVC, which fetch_data reads alike (flags with an optional value); spaces aside, the same commands
    # and DVC interpolates a string key as it is where Snakemake quotes it ('Y{youtube_id}.wav'): the shell reads
    # both alike
    def words(cmd):
        return cmd.replace(" ''", " ").replace("'Y{youtube_id}.wav'", "Y{youtube_id}.wav").split()

    assert {name: words(cmd) for name, cmd in dvc_commands(path).items()} == {
        name: words(cmd) for name, cmd in commands.items()}


def test_the_lineage_describes_the_stages_and_parameters_the_run_used(tmp_path):
    """Snakemake's --config/--configfile: the lineage shows the run's parameters on dvc.yaml's stages, or the
    stages of the dvc.yaml generated for a config with other stages; params.yaml's own run is dvc.yaml's."""
    from mmskip.params import merged
    from mmskip.report.lineage import CONFIG_DVC_YAML, CONFIG_GENERATED, CONFIG_RUN_PARAMS, lineage

    path = copy_workflow(tmp_path / "wf")
    params = read_params(path / "params.yaml")
    assert lineage(path, params=params)["config"] == CONFIG_DVC_YAML

    tuned = merged(params, {"mapper": {"lr": 0.0005}})
    result = lineage(path, params=tuned)
    assert result["config"] == CONFIG_RUN_PARAMS
    train = next(s for s in result["stages"] if s["name"] == "train_mapper@vqa")
    assert train["params"]["mapper.lr"] == 0.0005

    paper = merged(params, yaml.safe_load((REPO / "configs/paper/clip-opt-2.7b.yaml").read_text(encoding="utf-8")))
    result = lineage(path, params=paper)
    assert result["config"] == CONFIG_GENERATED and not result["dvc_lock"]
    fetch = next(s for s in result["stages"] if s["name"] == "fetch_model@llm")
    assert fetch["params"]["sources.llm"] == "facebook/opt-2.7b" and fetch["params"]["llm.num_layers"] == 32
