"""COCO at paper scale: Karpathy's split and VQAv2, in their published formats, become the
dataset folder the pipeline's readers take."""

import json

import pytest

from mmskip.data.coco import prepare_coco
from mmskip.data.formats import read_captions, read_vqa, scenes_paths


def karpathy():
    def image(cocoid, split, folder, sentences):
        return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "cocoid": cocoid, "split": split,
                "imgid": cocoid, "sentids": [s for s, _ in sentences],
                "sentences": [{"raw": raw, "tokens": raw.lower().split(), "sentid": s, "imgid": cocoid}
                              for s, raw in sentences]}
    return {"dataset": "coco", "images": [
        image(9, "train", "train2014", [(1, "A dog runs. "), (2, "A brown dog.")]),
        image(5, "restval", "val2014", [(3, "Two cats sleep.")]),
        image(7, "val", "val2014", [(4, "A red bus.")]),
        image(3, "test", "val2014", [(6, "A man rides a horse."), (5, "Someone on a horse.")]),
    ]}


def vqa(split_images):
    questions, annotations = [], []
    for qid, image in split_images:
        questions.append({"image_id": image, "question": f"what is in image {image}?", "question_id": qid})
        answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                   for i, a in enumerate(["dog"] * 7 + ["cat"] * 3)]
        annotations.append({"question_id": qid, "image_id": image, "answers": answers, "answer_type": "other",
                            "question_type": "what is", "multiple_choice_answer": "dog"})
    return {"questions": questions}, {"annotations": annotations}


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def inputs(tmp_path):
    k = write(tmp_path / "dataset_coco.json", karpathy())
    train_q, train_a = vqa([(90, 9), (91, 9), (92, 11)])  # image 11 is in no Karpathy split
    val_q, val_a = vqa([(30, 3), (50, 5), (70, 7)])
    files = [write(tmp_path / name, obj) for name, obj in [("q_train.json", train_q), ("a_train.json", train_a),
                                                           ("q_val.json", val_q), ("a_val.json", val_a)]]
    return k, files[0::2], files[1::2]


def test_karpathy_and_vqav2_become_the_pipelines_dataset_folder(inputs, tmp_path):
    k, questions, annotations = inputs
    out = tmp_path / "coco"
    counts = prepare_coco(k, questions, annotations, out)
    assert counts == {"dropped_questions": 1, "train": {"images": 2, "captions": 3, "questions": 3},
                      "val": {"images": 1, "captions": 1, "questions": 1},
                      "test": {"images": 1, "captions": 2, "questions": 1}}
    train = read_captions(scenes_paths(out, "train")["captions"])  # restval folded into train
    assert [(e.image_id, e.file_name, e.captions) for e in train] == [
        (5, "val2014/COCO_val2014_000000000005.jpg", ("Two cats sleep.",)),
        (9, "train2014/COCO_train2014_000000000009.jpg", ("A dog runs.", "A brown dog."))]
    test = read_captions(scenes_paths(out, "test")["captions"])
    assert test[0].captions == ("Someone on a horse.", "A man rides a horse.")  # in sentence id order
    paths = scenes_paths(out, "train")
    assert [(e.question_id, e.image_id) for e in read_vqa(paths["vqa_questions"], paths["vqa_annotations"])] == [
        (50, 5), (90, 9), (91, 9)]  # a VQAv2 val question on a restval image is training data
    paths = scenes_paths(out, "test")
    (example,) = read_vqa(paths["vqa_questions"], paths["vqa_annotations"])
    assert example.question_id == 30 and example.answers.count("dog") == 7 and example.multiple_choice_answer == "dog"


def test_an_unknown_karpathy_split_is_refused_by_name(inputs, tmp_path):
    k, questions, annotations = inputs
    data = json.loads(k.read_text())
    data["images"][0]["split"] = "holdout"
    write(k, data)
    with pytest.raises(ValueError, match=r"Karpathy image 9: split 'holdout'; allowed \['restval', 'test', 'train', 'val'\]"):
        prepare_coco(k, questions, annotations, tmp_path / "coco")
    assert not (tmp_path / "coco").exists()


def test_the_command_writes_the_folder_and_prints_the_counts(inputs, tmp_path):
    import subprocess
    import sys

    k, questions, annotations = inputs
    out = tmp_path / "coco"
    run = subprocess.run([sys.executable, "-m", "mmskip.cli", "prepare_coco", "--karpathy", str(k), "--out", str(out),
                          "--questions", *map(str, questions), "--annotations", *map(str, annotations)],
                         capture_output=True, text=True, check=True)
    assert json.loads(run.stdout)["test"] == {"images": 1, "captions": 2, "questions": 1}
    assert sorted(p.name for p in (out / "annotations").iterdir()) == sorted(
        f"{kind}_{split}.json" for split in ("train", "val", "test")
        for kind in ("captions", "vqa_questions", "vqa_annotations"))


def test_features_of_a_coco_folder_are_a_hub_clip_encoders_final_normed_tokens(inputs, tmp_path):
    """The feature cache of paper scale: a tiny CLIPVisionModel saved under the paper's id in the hub
    cache, the images of the prepared COCO folder, shard by shard; every token after CLIP's final
    norm, as a direct forward gives it."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from mmskip.features.cache import cache_features, load_features
    from mmskip.foundation.hub import resolve
    from mmskip.params import FeaturesConfig

    k, questions, annotations = inputs
    out = tmp_path / "coco"
    prepare_coco(k, questions, annotations, out)
    rng = np.random.default_rng(0)
    for image in json.loads(k.read_text())["images"]:
        path = out / "images" / image["filepath"] / image["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    torch.manual_seed(0)
    snapshot = tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / ("a" * 40)
    CLIPVisionModel(CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=2, num_attention_heads=2)).save_pretrained(snapshot)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(snapshot)
    encoder = resolve("openai/clip-vit-large-patch14", "a" * 40, tmp_path / "hub")

    index = cache_features(out, encoder, tmp_path / "features", FeaturesConfig(batch_size=1, shard_size=1))
    assert index["splits"]["train"] == {"shards": ["train-00000.safetensors", "train-00001.safetensors"],
                                        "num_images": 2, "tokens": 5, "dim": 16}
    assert load_file(str(tmp_path / "features" / "train-00001.safetensors"))["image_ids"].tolist() == [9]
    feats, rows = load_features(tmp_path / "features", "train")
    assert rows == {5: 0, 9: 1}
    model = CLIPVisionModel.from_pretrained(encoder).eval()
    pixels = CLIPImageProcessor.from_pretrained(encoder)(
        images=[Image.open(out / "images" / "train2014" / "COCO_train2014_000000000009.jpg").convert("RGB")],
        return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
        expected = model.post_layernorm(hidden)  # CLIP applies its final norm to the pooled token only
    torch.testing.assert_close(feats[1], expected[0], rtol=0, atol=0)
    assert not torch.allclose(feats[1], hidden[0])  # the final norm is applied to every token


def test_captions_alone_need_no_vqa_files_and_unpaired_files_are_refused(inputs, tmp_path):
    from mmskip.cli import main

    k, questions, _ = inputs
    main(["prepare_coco", "--karpathy", str(k), "--out", str(tmp_path / "captions_only")])
    assert read_captions(scenes_paths(tmp_path / "captions_only", "test")["captions"])[0].captions == (
        "Someone on a horse.", "A man rides a horse.")
    with pytest.raises(SystemExit, match="1 --questions files but 0 --annotations files"):
        main(["prepare_coco", "--karpathy", str(k), "--out", str(tmp_path / "bad"), "--questions", str(questions[0])])
    assert not (tmp_path / "bad").exists()


def okvqa(pairs):
    """OK-VQA's published layout: VQAv2's, with raw answers and no multiple_choice_answer."""
    questions = [{"image_id": image, "question": f"what could this be used for {qid}?", "question_id": qid}
                 for qid, image in pairs]
    answers = ["fishing", "sail", "sail", "fishing", "boat", "sail", "fishing", "fishing", "sail", "travel"]
    annotations = [{"image_id": image, "question_id": qid, "question_type": "eight", "answer_type": "other",
                    "confidence": 3, "answers": [{"answer_id": i + 1, "raw_answer": a, "answer_confidence": "yes",
                                                  "answer": a} for i, a in enumerate(answers)]}
                   for qid, image in pairs]
    return {"questions": questions}, {"annotations": annotations}


def test_okvqa_files_become_one_split_whole_keeping_the_others(inputs, tmp_path):
    from mmskip.data.coco import majority_answer, prepare_vqa

    k, questions, annotations = inputs
    out = tmp_path / "coco"
    prepare_coco(k, questions, annotations, out)
    train_before = (out / "annotations" / "vqa_questions_train.json").read_bytes()
    q, a = okvqa([(5770, 3), (5771, 57), (5769, 3)])
    counts = prepare_vqa([write(tmp_path / "q.json", q)], [write(tmp_path / "a.json", a)], "test", out, "val2014")
    assert counts == {"split": "test", "questions": 3, "images": 2, "majority_answers_filled": 3}
    paths = scenes_paths(out, "test")
    examples = read_vqa(paths["vqa_questions"], paths["vqa_annotations"])
    assert [(e.question_id, e.image_id) for e in examples] == [(5769, 3), (5770, 3), (5771, 57)]
    assert {e.multiple_choice_answer for e in examples} == {"fishing"}  # 4 fishing, 4 sail: the first given
    assert majority_answer([{"answer": "sail"}, {"answer": "fishing"}, {"answer": "fishing"}]) == "fishing"
    files = [i["file_name"] for i in json.loads(paths["captions"].read_text())["images"]]
    assert files == ["val2014/COCO_val2014_000000000003.jpg", "val2014/COCO_val2014_000000000057.jpg"]
    assert (out / "annotations" / "vqa_questions_train.json").read_bytes() == train_before
    del a["annotations"][1]
    with pytest.raises(ValueError, match=r"1 questions have no annotation, e.g. question_id \[5771\]"):
        prepare_vqa([write(tmp_path / "q.json", q)], [write(tmp_path / "a2.json", a)], "test", out, "val2014")
    with pytest.raises(ValueError, match="1 question files and 0 annotation files"):
        prepare_vqa([tmp_path / "q.json"], [], "val", out, "val2014")
    assert read_vqa(paths["vqa_questions"], paths["vqa_annotations"]) == examples  # nothing half-written


def _coco_images(root, folder, ids):
    for i in ids:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / f"COCO_{folder}_{i:012d}.jpg").write_bytes(b"jpeg")
    return root / folder


def test_okvqa_becomes_a_whole_dataset_folder_its_val_the_test_split(tmp_path):
    """The prepare_vqa stage: OK-VQA's train and val files (each naming its COCO folder as data_subtype) become
    splits train and test of their own folder, val empty; the COCO folders are linked and every image asked
    about is checked; bad input is refused before anything is written."""
    from mmskip.cli import main

    files = {}
    for part, pairs in (("train", [(10, 4), (11, 4), (12, 8)]), ("val", [(20, 3), (21, 57)])):
        q, a = okvqa(pairs)
        files[part] = (write(tmp_path / f"q_{part}.json", {**q, "data_subtype": f"{part}2014"}),
                       write(tmp_path / f"a_{part}.json", a))
    train2014 = _coco_images(tmp_path / "external", "train2014", [4, 8])
    val2014 = _coco_images(tmp_path / "external", "val2014", [3])
    out = tmp_path / "data" / "okvqa"
    args = ["prepare_vqa", "--train", *map(str, files["train"]), "--test", *map(str, files["val"]),
            "--images", str(train2014), str(val2014), "--out", str(out)]
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) the questions ask about are not under .*\n"
                                                r"  val2014/COCO_val2014_000000000057.jpg$"):
        main(args)
    assert not (out / "annotations").exists()
    _coco_images(tmp_path / "external", "val2014", [57])
    main(args)
    train = read_vqa(scenes_paths(out, "train")["vqa_questions"], scenes_paths(out, "train")["vqa_annotations"])
    test = read_vqa(scenes_paths(out, "test")["vqa_questions"], scenes_paths(out, "test")["vqa_annotations"])
    assert [(e.question_id, e.image_id) for e in train] == [(10, 4), (11, 4), (12, 8)]
    assert [(e.question_id, e.image_id) for e in test] == [(20, 3), (21, 57)]
    assert {e.multiple_choice_answer for e in train + test} == {"fishing"}
    assert [i["file_name"] for i in json.loads(scenes_paths(out, "test")["captions"].read_text())["images"]] == [
        "val2014/COCO_val2014_000000000003.jpg", "val2014/COCO_val2014_000000000057.jpg"]
    val = scenes_paths(out, "val")
    assert json.loads(val["vqa_questions"].read_text()) == {"questions": []}
    assert json.loads(val["captions"].read_text()) == {"images": [], "annotations": []}
    assert (out / "images" / "train2014").resolve() == train2014.resolve()

    before = {p: p.read_bytes() for p in (out / "annotations").iterdir()}
    write(files["val"][0], okvqa([(20, 3)])[0])  # no data_subtype
    with pytest.raises(SystemExit, match=r"q_val.json: no data_subtype \(train2014, val2014\)"):
        main(args)
    with pytest.raises(SystemExit):  # argparse: --test takes the questions and the annotations file
        main(["prepare_vqa", "--train", *map(str, files["train"]), "--test", str(files["val"][0]), "--images",
              str(train2014), "--out", str(out)])
    assert {p: p.read_bytes() for p in (out / "annotations").iterdir()} == before


# --- GQA ----------------------------------------------------------------------------------------

def gqa_entry(image, question, answer, structural="query"):
    return {"imageId": image, "question": question, "answer": answer, "fullAnswer": f"It is {answer}.",
            "isBalanced": True, "types": {"structural": structural, "semantic": "attr", "detailed": "x"},
            "semantic": [{"operation": "select", "argument": "x", "dependencies": []}]}


def test_gqa_question_files_become_one_split_in_vqav2_format(inputs, tmp_path):
    from mmskip.cli import main
    from mmskip.data.gqa import prepare_gqa
    from mmskip.evaluation.vqa_metric import vqa_accuracy

    k, questions, annotations = inputs
    out = tmp_path / "coco"
    prepare_coco(k, questions, annotations, out)  # a folder with other splits, which are kept
    train_before = (out / "annotations" / "vqa_questions_train.json").read_bytes()
    first = write(tmp_path / "val_a.json", {"201307251": gqa_entry("n161313", "Is it overcast?", "no", "verify"),
                                           "05451384": gqa_entry("2354786", "What color is the bus?", "red")})
    second = write(tmp_path / "val_b.json", {"20968379": gqa_entry("2354786", "Which side is the cat on?", "left"),
                                            "9": gqa_entry("2375429", "Is the man riding a horse?", "yes")})
    counts = prepare_gqa([first, second], "test", out, limit=3)
    assert counts == {"split": "test", "questions": 3, "questions_in_files": 4, "images": 2}
    paths = scenes_paths(out, "test")
    examples = read_vqa(paths["vqa_questions"], paths["vqa_annotations"])
    # the first three by id; images numbered in the sorted order of GQA's ids ("2354786" < "2375429")
    assert [(e.question_id, e.image_id, e.question_type, e.multiple_choice_answer) for e in examples] == [
        (9, 1, "query", "yes"), (5451384, 0, "query", "red"), (20968379, 0, "query", "left")]
    assert all(e.answers == (e.multiple_choice_answer,) * 10 for e in examples)
    # exact match, GQA's measure (VQAv2's evaluation normalises only whitespace when the answers agree)
    assert [vqa_accuracy(p, examples[1].answers) for p in (" red", "Red", "blue")] == [1.0, 0.0, 0.0]
    images = json.loads(paths["captions"].read_text())["images"]
    assert images == [{"id": 0, "gqa_image_id": "2354786", "file_name": "gqa/2354786.jpg"},
                      {"id": 1, "gqa_image_id": "2375429", "file_name": "gqa/2375429.jpg"}]
    assert read_captions(paths["captions"])
    assert (out / "annotations" / "vqa_questions_train.json").read_bytes() == train_before
    gqa_ids = {a["question_id"]: a["gqa_image_id"]
               for a in json.loads(paths["vqa_annotations"].read_text())["annotations"]}
    assert gqa_ids == {9: "2375429", 5451384: "2354786", 20968379: "2354786"}

    prepare_gqa([first], "val", out, image_folder="gqa_images")
    val = json.loads(scenes_paths(out, "val")["captions"].read_text())["images"]
    assert [i["file_name"] for i in val] == ["gqa_images/2354786.jpg", "gqa_images/n161313.jpg"]

    # the prepare_gqa stage: train and val_balanced files become a whole folder of its own, its images linked
    images = tmp_path / "external" / "images"
    images.mkdir(parents=True)
    for name in ("2354786", "2375429", "n161313"):
        (images / f"{name}.jpg").write_bytes(b"jpeg")
    train = write(tmp_path / "train.json", {"7": gqa_entry("n161313", "Is it sunny?", "yes", "verify")})
    gqa = tmp_path / "data" / "gqa"
    args = ["prepare_gqa", "--train", str(train), "--test", str(first), str(second), "--images", str(images),
            "--out", str(gqa)]
    main([*args, "--limit", "3"])
    tests = read_vqa(scenes_paths(gqa, "test")["vqa_questions"], scenes_paths(gqa, "test")["vqa_annotations"])
    assert [e.question_id for e in tests] == [9, 5451384, 20968379]
    assert [e.question_id for e in read_vqa(scenes_paths(gqa, "train")["vqa_questions"],
                                            scenes_paths(gqa, "train")["vqa_annotations"])] == [7]
    assert json.loads(scenes_paths(gqa, "val")["vqa_questions"].read_text()) == {"questions": []}
    assert [i["file_name"] for i in json.loads(scenes_paths(gqa, "test")["captions"].read_text())["images"]] == [
        "images/2354786.jpg", "images/2375429.jpg"]
    assert (gqa / "images" / "images").resolve() == images.resolve()

    # bad input is refused, naming it, and nothing is written
    before = {p: p.read_bytes() for p in (gqa / "annotations").iterdir()}
    bad = {"q1": write(tmp_path / "b1.json", {"x12": gqa_entry("1", "q?", "a")}),
           "q2": write(tmp_path / "b2.json", {"12": {"imageId": "1", "question": "q?"}}),
           "q3": write(tmp_path / "b3.json", [1, 2])}
    for path, message in ((bad["q1"], r"question id 'x12' is not a number"),
                          (bad["q2"], r"question 12 lacks \['answer'\]"),
                          (bad["q3"], r"not a list"),
                          (second, r"val_b.json: question 20968379 is given twice")):
        with pytest.raises(SystemExit, match=message):
            main(["prepare_gqa", "--train", str(train), "--test", *([str(second)] if path is second else []),
                  str(path), "--images", str(images), "--out", str(gqa)])
    with pytest.raises(SystemExit, match=r"limit=-1: allowed 0"):
        main([*args, "--limit", "-1"])
    (images / "2375429.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) the questions ask about .*\n  images/2375429.jpg$"):
        main(args)
    assert {p: p.read_bytes() for p in (gqa / "annotations").iterdir()} == before


def test_image_folders_are_linked_and_every_listed_image_is_checked(inputs, tmp_path):
    """prepare_coco --images (the pipeline's stage): the extracted train2014/ and val2014/ are linked under
    the folder's images/, and an image the split lists but the zip lacks is named, with nothing written."""
    from mmskip.cli import main

    k, questions, annotations = inputs
    extracted = tmp_path / "external"
    for image in json.loads(k.read_text())["images"]:
        (extracted / image["filepath"]).mkdir(parents=True, exist_ok=True)
        (extracted / image["filepath"] / image["filename"]).write_bytes(b"jpeg")
    missing = extracted / "val2014" / "COCO_val2014_000000000007.jpg"
    missing.unlink()
    out = tmp_path / "data" / "coco"
    args = ["prepare_coco", "--karpathy", str(k), "--out", str(out), "--images", str(extracted / "train2014"),
            str(extracted / "val2014")]
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) of Karpathy's split are not under .*\n"
                                                r"  val2014/COCO_val2014_000000000007.jpg$"):
        main(args)
    assert not (out / "annotations").exists()
    missing.write_bytes(b"jpeg")
    main(args)
    link = out / "images" / "val2014"
    assert link.is_symlink() and not link.readlink().is_absolute()
    assert link.resolve() == (extracted / "val2014").resolve()
    assert (out / "annotations" / "captions_test.json").is_file()
    with pytest.raises(FileNotFoundError, match="--images .*nowhere: no such folder"):
        main([*args[:-2], str(tmp_path / "nowhere")])
