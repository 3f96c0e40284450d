"""Paper scale through the real Snakefile, offline: a "paper-mini" config (configs/paper/clip-opt-2.7b.yaml
with tiny sizes) selected by --configfile. The fetch_data stage downloads COCO-shaped archives (Karpathy's
split, COCO 2014's image zips, VQAv2's four zips) from a loopback server through a source catalog; the
fetch_model stage finds tiny checkpoints of the real classes (OPTForCausalLM, CLIPVisionModel) under the
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
from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, OPTConfig, OPTForCausalLM,
                          PreTrainedTokenizerFast)

from mmskip.params import merged
from mmskip.stages import stage_table
from test_download import Server
from test_hub import COMMIT, put_in_cache
from test_pipeline_smoke import SMOKE
from workflow_utils import BIN, REPO, TASKS, check, copy_workflow, job_counts, read_params, run

pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")

PAPER_CONFIGS = sorted((REPO / "configs" / "paper").glob("*.yaml"))
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SIZES = {"big": 12, "small": 5}  # half the side of the square, on a 32-pixel grey image
# Karpathy split of the mini COCO: (split, count); train and restval images are in train2014, val and test in val2014
SPLITS = [("train", 20), ("restval", 6), ("val", 6), ("test", 10)]
WORDS = ["<unk>", "<s>", "</s>", "<pad>", "Question", "Answer", "Caption", ":", "?", "what", "color", "is", "the",
         "square", "a", "on", "grey", "yes", "no", *COLORS, *SIZES]
TINY_LLM = {"hidden_size": 16, "num_layers": 4, "num_heads": 2, "ffn_dim": 32, "max_positions": 128}
TINY_LLM_SMALL = {"hidden_size": 8, "num_layers": 2, "num_heads": 2, "ffn_dim": 16, "max_positions": 128}
HUB_IDS = {"llm": "facebook/opt-2.7b", "llm_small": "facebook/opt-1.3b", "encoder": "openai/clip-vit-large-patch14"}
# the published file names of the sources (mmskip.data.sources), each zip with the member the pipeline reads
ARCHIVES = {
    "karpathy_splits": "caption_datasets.zip", "coco_train2014": "train2014.zip", "coco_val2014": "val2014.zip",
    "vqav2_questions_train": "v2_Questions_Train_mscoco.zip", "vqav2_questions_val": "v2_Questions_Val_mscoco.zip",
    "vqav2_annotations_train": "v2_Annotations_Train_mscoco.zip",
    "vqav2_annotations_val": "v2_Annotations_Val_mscoco.zip"}


def mini_coco() -> dict[str, bytes]:
    """The seven archives of a tiny COCO: images of one square, two captions each, two questions each."""
    rng = np.random.default_rng(0)
    images, files, questions, annotations = [], {"train2014": {}, "val2014": {}}, {"train": [], "val": []}, \
        {"train": [], "val": []}
    cocoid, sentid, qid = 1, 1, 1
    for split, count in SPLITS:
        folder = "train2014" if split in ("train", "restval") else "val2014"
        for _ in range(count):
            color, size = list(COLORS)[cocoid % len(COLORS)], list(SIZES)[(cocoid // len(COLORS)) % len(SIZES)]
            pixels = np.full((32, 32, 3), 128, dtype=np.int16) + rng.integers(-10, 10, (32, 32, 3))
            half = SIZES[size]
            pixels[16 - half:16 + half, 16 - half:16 + half] = COLORS[color]
            buffer = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
            name = f"COCO_{folder}_{cocoid:012d}.jpg"
            files[folder][f"{folder}/{name}"] = buffer.getvalue()
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
    archives = {}
    for source, content in members.items():
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for member, data in sorted(content.items()):
                archive.writestr(zipfile.ZipInfo(member, date_time=(2014, 1, 1, 0, 0, 0)), data)
        archives[source] = buffer.getvalue()
    return archives


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


# one task (no α-SubNet): the smoke run has both through the trained pipeline; COCO's captions go through
# prepare_coco here and through LLaVA's grid below
MINI_TASKS = ["vqa"]


def paper_mini(catalog, cache) -> dict:
    """configs/paper/clip-opt-2.7b.yaml with the smoke test's sizes and tiny shapes, on the CPU, reading the
    test's catalog and hub cache."""
    config = yaml.safe_load((REPO / "configs" / "paper" / "clip-opt-2.7b.yaml").read_text(encoding="utf-8"))
    for section in ("features", "mapper", "evaluation", "skipping", "pruning", "compression", "train_compressed",
                    "bench", "report"):
        config[section] = {**config.get(section, {}), **SMOKE[section]}
    config["runtime"] = {"device": "cpu", "dtype": "float32"}
    config["sources"].update(catalog=str(catalog), hub_cache=str(cache))
    config["llm"], config["llm_small"] = dict(TINY_LLM), dict(TINY_LLM_SMALL)
    config["evaluation"]["num_beams"] = 1
    config["tasks"] = MINI_TASKS
    config["skipping"]["modes"] = ["skip_block"]  # one job per task: the other modes run in the smoke test
    config["compression"]["mask_sets"] = ["wanda"]
    return config


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The paper-mini run: a workflow copy, the loopback server, the hub cache; `snakemake --cores 2
    --configfile paper-mini.yaml` run to reports/all.html, offline (HF_HUB_OFFLINE=1)."""
    root = tmp_path_factory.mktemp("paper-mini")
    path = copy_workflow(root / "wf")
    server = Server()
    archives = mini_coco()
    catalog = {}
    for source, data in archives.items():
        server.files[f"/{ARCHIVES[source]}"] = data
        catalog[source] = {"url": server.url(f"/{ARCHIVES[source]}"), "md5": hashlib.md5(data).hexdigest()}
    (root / "catalog.yaml").write_text(yaml.safe_dump(catalog), encoding="utf-8")
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
    path, root, server, archives, output = mini
    assert job_counts(output)["fetch_data"] == len(ARCHIVES)
    assert job_counts(output)["fetch_model"] == 3 and "pretrain_llm" not in job_counts(output)
    # each archive requested once, hash-checked against the catalog's md5, then extracted whole
    assert sorted(p for p, _ in server.log) == sorted(f"/{name}" for name in ARCHIVES.values())
    for source, name in ARCHIVES.items():
        assert (path / "data/external/downloads" / name).read_bytes() == archives[source]
    coco = path / "data/coco"
    assert (coco / "images" / "val2014").is_symlink()
    assert (coco / "images" / "val2014").resolve() == (path / "data/external/coco_val2014/val2014").resolve()
    test = json.loads((coco / "annotations" / "captions_test.json").read_text())
    assert len(test["images"]) == dict(SPLITS)["test"]
    train_q = json.loads((coco / "annotations" / "vqa_questions_train.json").read_text())["questions"]
    assert len(train_q) == 2 * (dict(SPLITS)["train"] + dict(SPLITS)["restval"])  # restval folded into train
    # the hub models: reference folders naming the commit, loaded offline by every job
    for model, repo_id in HUB_IDS.items():
        assert json.loads((path / "models" / model / "hub.json").read_text()) == {
            "id": repo_id, "revision": "main", "commit": COMMIT, "cache": str(root / "hub")}
    mapper = json.loads((path / "models/mapper/vqa/config.json").read_text())
    assert (mapper["llm_dim"], mapper["encoder_dim"], mapper["num_visual_tokens"]) == (16, 16, 5)
    # the whole split decoded by the baseline, every family in the summary, the report written
    baseline = json.loads((path / "results/baseline/vqa/predictions.json").read_text())
    assert len(baseline["ids"]) == len(baseline["predictions"]) == 2 * dict(SPLITS)["test"]
    with open(path / "reports/summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {(r["task"], r["family"]) for r in rows} == {(t, f) for t in MINI_TASKS
                                                        for f in ("baseline", "blind", "skip", "compress", "trained")}
    html = (path / "reports/all.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html  # the qualitative examples' COCO images
    assert not (path / "results/foundation").exists()  # nothing was pretrained
    # the lineage describes this run's stages (generated for the config), not dvc.yaml's embedded default
    lineage = json.loads((path / "reports/lineage.json").read_text())
    assert lineage["config"] == "generated for this run's config" and not lineage["dvc_lock"]
    names = {s["name"].split("@")[0] for s in lineage["stages"]}
    assert {"fetch_data", "prepare_coco", "fetch_model"} <= names and "make_scenes" not in names
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
    assert counts["fetch_data"] == len(ARCHIVES) and counts["prepare_coco"] == 1
    assert not {"make_scenes", "train_tokenizer", "pretrain_llm", "pretrain_encoder"} & set(counts)
    if "llava" in config.stem:  # without training: the model, its grid per task, the report
        assert counts == {"fetch_data": len(ARCHIVES), "prepare_coco": 1, "fetch_model": 1,
                          "evaluate_llava": len(TASKS), "report": 1, "all": 1}
    else:
        assert counts["fetch_model"] == 3
        assert counts["evaluate_skip"] == len(TASKS) * len(read_params(REPO / "params.yaml")["skipping"]["modes"])
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

    mini_path, root, *_ = mini
    path = copy_workflow(tmp_path / "wf")
    shutil.copytree(mini_path / "data", path / "data", symlinks=True)  # modification times kept: up to date
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{LLAVA_ID.replace('/', '--')}" / "snapshots" / COMMIT
    save_tiny_llava(snapshot, num_layers=TINY_LLAVA_LM["num_layers"])
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(COMMIT)
    config = yaml.safe_load((REPO / "configs" / "paper" / "llava-1.5-7b.yaml").read_text(encoding="utf-8"))
    config["runtime"] = {"device": "cpu", "dtype": "float32"}
    config["sources"].update(catalog=str(root / "catalog.yaml"), hub_cache=str(cache))
    config["evaluation"].update(batch_size=4, vqa_max_new_tokens=3, caption_max_new_tokens=5)
    config["skipping"].update(modes=["skip_block", "parallel_attn_ffn"], scopes=["generated"], intervals=[2],
                              vqa_questions=8, caption_images=4)
    wrong = {**config, "llm": {**TINY_LLAVA_LM, "ffn_dim": 11008}}
    (path / "wrong.yaml").write_text(yaml.safe_dump(wrong), encoding="utf-8")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    # a section llm that is not the checkpoint's language model: fetch_model stops, naming the key
    result = run([BIN / "snakemake", "--cores", "2", "--configfile", "wrong.yaml"], cwd=path, env=env)
    assert result.returncode != 0
    log = (path / "logs" / "fetch_model" / "llava.log").read_text(encoding="utf-8")
    assert "ffn_dim = 11008 in params, but the checkpoint's intermediate_size is 64" in log
    assert not (path / "models" / "llava").exists()

    (path / "llava-mini.yaml").write_text(yaml.safe_dump({**config, "llm": TINY_LLAVA_LM}), encoding="utf-8")
    output = check(run([BIN / "snakemake", "--cores", "2", "--configfile", "llava-mini.yaml"], cwd=path, env=env))
    counts = job_counts(output.stdout + output.stderr)
    assert counts == {"fetch_model": 1, "evaluate_llava": len(TASKS), "report": 1, "all": 1}
    assert json.loads((path / "models" / "llava" / "hub.json").read_text()) == {
        "id": LLAVA_ID, "revision": "main", "commit": COMMIT, "cache": str(cache)}
    for task in TASKS:
        run_json = json.loads((path / "results" / "llava" / task / "run.json").read_text())
        assert run_json["model"] == {"id": LLAVA_ID, "revision": "main", "commit": COMMIT}
        assert run_json["num_layers"] == TINY_LLAVA_LM["num_layers"] and run_json["device"] == "cpu"
        assert run_json["check_generate"]["equal"] == run_json["check_generate"]["examples"] > 0
        assert run_json["modes"] == ["skip_block", "parallel_attn_ffn"]
    with open(path / "reports/summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {(r["task"], r["family"]) for r in rows} == {(t, "llava_skip") for t in TASKS}
    html = (path / "reports/all.html").read_text(encoding="utf-8")
    assert 'id="llava"' in html and f"{LLAVA_ID} @ main (commit {COMMIT})" in html
    assert "Nothing was trained in this run" in html and "<h3>Mapper training</h3>" not in html
    assert not {"mapper", "llm", "encoder"} & {p.name for p in (path / "models").iterdir()}
    lineage = json.loads((path / "reports/lineage.json").read_text())
    assert {s["name"].split("@")[0] for s in lineage["stages"]} == {
        "fetch_data", "prepare_coco", "fetch_model", "evaluate_llava", "report"}


def test_use_config_is_dvcs_configfile_and_refuses_a_bad_config_writing_nothing(tmp_path):
    path = copy_workflow(tmp_path / "wf")
    before = {name: (path / name).read_bytes() for name in ("params.yaml", "dvc.yaml")}
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  data: coco\n  llm: facebook/opt-2.7b\n", encoding="utf-8")
    result = run([BIN / "mmskip", "use_config", bad], cwd=path)
    assert result.returncode != 0
    assert ("sources.data='coco', sources.llm_small='', sources.encoder='': sources.data 'coco' needs a hub id for "
            "llm_small, encoder") in result.stderr
    assert {name: (path / name).read_bytes() for name in before} == before

    config = REPO / "configs" / "paper" / "clip-opt-2.7b.yaml"
    check(run([BIN / "mmskip", "use_config", config], cwd=path))
    params = read_params(path / "params.yaml")
    wanted = yaml.safe_load(config.read_text(encoding="utf-8"))
    for section, values in wanted.items():
        assert {k: params[section][k] for k in values} == values, section
    text = (path / "params.yaml").read_text(encoding="utf-8")
    assert "# Where the data and the foundation models come from." in text  # params.yaml's comments kept
    assert "intervals: [2, 3, 4]" in text  # lists as params.yaml writes them
    stages = yaml.safe_load((path / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert {"fetch_data", "prepare_coco", "fetch_model"} <= set(stages) and "make_scenes" not in stages
    check(run([BIN / "python", "-m", "mmskip.stages", "--check", "dvc.yaml"], cwd=path))


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
