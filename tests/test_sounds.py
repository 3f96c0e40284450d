"""The embedded default's audio modality: the generated sounds (mmskip.data.sounds), the tiny Audio Spectrogram
Transformer pretrained on them (mmskip.foundation.audio_encoder), the LLM's corpus with their texts, the params
rules of the generated dataset, and the audio tasks' stages in both tools."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
import yaml

from mmskip.data.formats import AUDIO, read_captions, read_vqa, split_images
from mmskip.data.sounds import (DURATIONS, LOUDNESS, PITCHES, SILENCE, TIMBRES, Note, Sound, clip_seconds,
                                make_sounds, render, tone)
from mmskip.params import AudioEncoderConfig, ParamsError, PromptsConfig, SoundsConfig, load_params
from workflow_utils import BIN, REPO, check, copy_workflow, dvc_commands, dvc_init, job_counts, run, snakemake_commands

SMALL = SoundsConfig(num_train=120, num_val=24, num_test=24, num_text_sounds=40)


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    out = tmp_path_factory.mktemp("sounds") / "sounds"
    make_sounds(out, 3, SMALL)
    return out


def _records(sounds, split):
    return json.loads((sounds / f"scenes_{split}.json").read_text())["scenes"]


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_clips(sounds, tmp_path):
    again = tmp_path / "again"
    make_sounds(again, 3, SMALL)
    files = sorted(p.relative_to(sounds) for p in sounds.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((sounds / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = tmp_path / "other"
    make_sounds(other, 4, SMALL)
    assert (other / "audio/train/000001.wav").read_bytes() != (sounds / "audio/train/000001.wav").read_bytes()


def test_files_are_the_image_datasets_formats_and_the_clips_are_their_images(sounds):
    import soundfile

    for split, size in (("train", 120), ("val", 24), ("test", 24)):
        clips = split_images(sounds, split, AUDIO)
        assert [i for i, _ in clips] == [r["image_id"] for r in _records(sounds, split)] and len(clips) == size
        samples, rate = soundfile.read(clips[0][1])
        assert rate == SMALL.sample_rate and len(samples) == round(clip_seconds(SMALL) * rate)
        captions = read_captions(sounds / "annotations" / f"captions_{split}.json")
        assert [c.image_id for c in captions] == [i for i, _ in clips] and all(len(c.captions) == 5 for c in captions)
        questions = read_vqa(sounds / "annotations" / f"vqa_questions_{split}.json",
                             sounds / "annotations" / f"vqa_annotations_{split}.json")
        assert all(len(q.answers) == 10 for q in questions)
    ids = [i for split in ("train", "val", "test") for i, _ in split_images(sounds, split, AUDIO)]
    assert len(set(ids)) == len(ids)  # one id space across the splits


def test_descriptions_and_answers_follow_the_notes(sounds):
    records = {r["image_id"]: r for r in _records(sounds, "train")}
    for record in records.values():
        notes = [Note(**n) for n in record["notes"]]
        words = record["description"].rstrip(".").split(" ")
        assert len(words) == 2 * SMALL.slots
        for slot in range(SMALL.slots):
            held = [n for n in notes if n.slot == slot]
            pair = " ".join(words[2 * slot : 2 * slot + 2])
            assert pair == (f"{held[0].word()} {held[0].duration}" if held else SILENCE)
        assert [n.slot for n in notes] == sorted(n.slot for n in notes) and SMALL.min_notes <= len(notes)
    questions = read_vqa(sounds / "annotations/vqa_questions_train.json",
                         sounds / "annotations/vqa_annotations_train.json")
    checked = collections.Counter()
    for q in questions:
        notes = records[q.image_id]["notes"]
        canonical = collections.Counter(q.answers).most_common(1)[0][0]
        if q.question == "How many notes are there?":
            assert canonical == str(len(notes))
        elif q.question.startswith("What is the pitch of the first"):
            assert canonical == notes[0]["pitch"]
        elif q.question.startswith("Which timbre does the last"):
            assert canonical == notes[-1]["timbre"]
        elif q.question == "Is the first note higher than the last note?":
            order = list(PITCHES)
            assert canonical == ("yes" if order.index(notes[0]["pitch"]) > order.index(notes[-1]["pitch"]) else "no")
        else:
            continue
        checked[q.question.split()[2]] += 1
    assert len(checked) == 4, checked


def test_the_question_text_alone_cannot_answer_well(sounds):
    """The best a blind model can do is each question's most common answer in training: it must stay far below
    what listening gives (the issue's blind gap)."""
    train = read_vqa(sounds / "annotations/vqa_questions_train.json", sounds / "annotations/vqa_annotations_train.json")
    by_question = collections.defaultdict(collections.Counter)
    for q in train:
        by_question[q.question][q.multiple_choice_answer] += 1
    best = {question: counts.most_common(1)[0][0] for question, counts in by_question.items()}
    test = read_vqa(sounds / "annotations/vqa_questions_test.json", sounds / "annotations/vqa_annotations_test.json")
    blind = np.mean([q.multiple_choice_answer == best.get(q.question) for q in test])
    assert blind < 0.6, blind


def test_a_note_sounds_at_its_pitch_and_loudness_and_a_pulse_has_odd_harmonics_alone():
    rate = SMALL.sample_rate
    t = np.arange(rate) / rate  # one second: bins of 1 Hz
    for timbre in TIMBRES:
        wave = tone(timbre, PITCHES["mid"], t, rate)
        spectrum = np.abs(np.fft.rfft(wave))
        assert int(spectrum.argmax()) == PITCHES["mid"] and abs(np.abs(wave).max() - 1) < 0.05
        second, third = spectrum[int(2 * PITCHES["mid"])], spectrum[int(3 * PITCHES["mid"])]
        assert (second / spectrum.max() > 0.2) == (timbre == "saw"), timbre
        assert (third / spectrum.max() > 0.2) == (timbre != "sine"), timbre
        assert spectrum[int(rate / 2) - 5 :].max() < 1e-3 * spectrum.max()  # band-limited: nothing aliases
    cfg = SoundsConfig(noise_std=0.0)
    note = Note(1, "high", "sine", "soft", "long", 0.35)
    samples = render(Sound(1, [note]), np.random.default_rng(0), cfg)
    begin, end = round(note.start * rate), round((note.start + DURATIONS["long"] * cfg.slot_seconds) * rate)
    assert np.abs(samples[:begin]).max() == 0 and np.abs(samples[end:]).max() == 0  # the other slots are silent
    assert abs(np.abs(samples).max() - LOUDNESS["soft"]) < 0.01


@pytest.mark.parametrize("override, expected", [
    ({"sounds": {"min_notes": 3, "max_notes": 2}},
     "sounds.min_notes=3, sounds.max_notes=2: min_notes must not exceed max_notes"),
    ({"sounds": {"max_notes": 5}}, "sounds.max_notes=5, sounds.slots=4: max_notes must not exceed slots"),
    ({"tasks": ["audio_qa"], "sources": {"data": "coco", "llm": "a/b", "llm_small": "a/c", "encoder": "a/d"}},
     "'audio_qa' reads the generated 'sounds', which the embedded default makes"),
    ({"tasks": ["vqa", "clotho"]}, "'clotho' reads dataset 'clotho', which paper scale downloads"),
])
def test_params_refuse_sounds_that_cannot_be_made_and_the_generated_dataset_at_paper_scale(tmp_path, override,
                                                                                          expected):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(override))
    with pytest.raises(ParamsError) as err:
        load_params(REPO / "params.yaml", [tmp_path / "c.yaml"])
    assert expected in str(err.value), str(err.value)


def test_the_llm_corpus_holds_the_sounds_texts_and_composes_their_note_words(sounds, tmp_path):
    from mmskip.foundation.llm import ComposedEmbedding
    from mmskip.foundation.text import corpus
    from mmskip.foundation.tokenizer import train_tokenizer
    from mmskip.data.scenes import make_scenes
    from mmskip.params import ScenesConfig, TokenizerConfig

    scenes = tmp_path / "scenes"
    make_scenes(scenes, 0, ScenesConfig(num_train=40, num_val=8, num_test=8, num_text_scenes=20))
    prompts = PromptsConfig()
    alone, both = corpus(scenes, prompts), corpus(scenes, prompts, generated={"sounds": sounds})
    assert both[: len(alone)] == alone  # the scenes' corpus unchanged, the sounds' after it
    added = both[len(alone):]
    assert {s.task for s in added} == {"audio_qa", "audio_caption"}
    questions = read_vqa(sounds / "annotations/vqa_questions_train.json",
                         sounds / "annotations/vqa_annotations_train.json")
    text = json.loads((sounds / "text_scenes.json").read_text())["scenes"]
    assert len(added) == 5 * SMALL.num_train + len(questions) + sum(5 + len(r["questions"]) for r in text)
    tokenizer = train_tokenizer(scenes, tmp_path / "tok", TokenizerConfig(), prompts, generated={"sounds": sounds})
    table = ComposedEmbedding(tokenizer, 8, 0.02).materialise()
    word = {t.lstrip("Ġ"): i for t, i in tokenizer.get_vocab().items() if t.startswith("Ġ")}
    composed = [(f"{a}{b}{c}", (a, b, c)) for a in LOUDNESS for b in PITCHES for c in TIMBRES if f"{a}{b}{c}" in word]
    assert len(composed) >= len(LOUDNESS) * len(PITCHES) * len(TIMBRES) // 2, composed  # whole words in the vocab
    for note, parts in composed:  # a note word is the sum of its three words
        assert torch.allclose(table[word[note]], sum(table[word[w]] for w in parts), atol=1e-6), note


def test_the_audio_encoder_learns_the_notes_and_its_cache_is_its_output(sounds, tmp_path):
    from transformers import ASTModel

    from mmskip.features.cache import cache_features, encoder_inputs, load_encoder, load_features
    from mmskip.foundation.audio_encoder import SPECIAL, pretrain_audio_encoder, token_targets, token_times
    from mmskip.params import FeaturesConfig

    cfg = AudioEncoderConfig(steps=150)
    result = pretrain_audio_encoder(sounds, tmp_path / "enc", tmp_path / "enc.json", 0, cfg)
    assert result["heldout_accuracy_per_head"]["pitch"] > 0.8, result  # far above silence-everywhere
    model, extractor = load_encoder(tmp_path / "enc")
    assert isinstance(model, ASTModel) and extractor.sampling_rate == SMALL.sample_rate and extractor.do_normalize
    features = cache_features(sounds, tmp_path / "enc", tmp_path / "features", FeaturesConfig(batch_size=16))
    tokens = (cfg.max_length - cfg.num_mel_bins) // cfg.time_stride + 1
    assert features["splits"]["test"]["tokens"] == SPECIAL + tokens == len(token_times(cfg)) + SPECIAL
    feats, rows = load_features(tmp_path / "features", "test")
    clips = split_images(sounds, "test", AUDIO)[:4]
    with torch.no_grad():
        direct = model(input_values=encoder_inputs(model, extractor, [p for _, p in clips])).last_hidden_state
    assert torch.equal(feats[[rows[i] for i, _ in clips]], direct)
    # a token is labelled with the note sounding at its centre, silence elsewhere
    record = _records(sounds, "test")[0]
    targets = token_targets([record], cfg, SMALL.slot_seconds)["pitch"][0]
    times = token_times(cfg)
    for t, label in enumerate(targets.tolist()):
        sounding = [n for n in record["notes"]
                    if n["start"] <= times[t] < n["start"] + DURATIONS[n["duration"]] * SMALL.slot_seconds]
        assert label == (list(PITCHES).index(sounding[0]["pitch"]) + 1 if sounding else 0)


def test_the_audio_tasks_plan_the_sounds_their_encoder_and_a_cache_each_alike_in_both_tools(tmp_path):
    """configs/embedded/image-audio.yaml: make_sounds, the AST pretrained on them, the tokenizer and both LLMs on
    both modalities' texts, one feature cache per dataset (the sounds' by the AST), each task reading its own; DVC
    (after `mmskip use_config`) runs the same commands as Snakemake."""
    path = copy_workflow(tmp_path / "wf")
    config = REPO / "configs" / "embedded" / "image-audio.yaml"
    counts = job_counts(check(run([BIN / "snakemake", "-n", "--configfile", config], cwd=path)).stdout)
    assert (counts["make_scenes"], counts["make_sounds"], counts["pretrain_encoder"], counts["pretrain_audio_encoder"],
            counts["cache_features"], counts["train_mapper"], counts["subnet"]) == (1, 1, 1, 1, 2, 4, 1)
    check(run([BIN / "mmskip", "use_config", config], cwd=path))
    commands = snakemake_commands(path)
    assert " --scenes data/scenes --sounds data/sounds --out models/tokenizer " in commands["train_tokenizer"]
    assert " --scenes data/scenes --sounds data/sounds --tokenizer models/tokenizer " in commands["pretrain_llm@llm"]
    assert "--encoder models/audio_encoder --out results/features/sounds " in commands["cache_features@sounds"]
    assert "--encoder models/encoder --out results/features/scenes " in commands["cache_features@scenes"]
    for task, dataset in (("vqa", "scenes"), ("audio_qa", "sounds"), ("audio_caption", "sounds")):
        assert f" --scenes data/{dataset} --features results/features/{dataset} " in commands[f"train_mapper@{task}"]
    per_task = (" --scenes data/scenes data/scenes data/sounds data/sounds --features results/features/scenes "
                "results/features/scenes results/features/sounds results/features/sounds ")
    assert per_task in commands["prune_wanda"] and " --tasks vqa caption audio_qa audio_caption " in commands[
        "prune_wanda"]
    dvc_init(path)
    assert dvc_commands(path) == commands
    params = yaml.safe_load((path / "params.yaml").read_text())
    assert params["tasks"] == ["vqa", "caption", "audio_qa", "audio_caption"]


def test_the_subnet_section_compares_task_masks_within_and_across_modalities():
    from mmskip.report.compression import _modality_pairs

    def pair(a, b, value):
        return {"tasks": [a, b], "iou_per_block": [value, value + 0.2]}

    subnet = {"task_iou": [pair("vqa", "caption", 0.5), pair("vqa", "audio_qa", 0.2), pair("caption", "audio_qa", 0.3),
                           pair("audio_qa", "audio_caption", 0.6)]}
    assert _modality_pairs(subnet) == [
        {"modalities": "audio \u2013 audio", "pairs": "audio_qa vs audio_caption 0.700", "iou": "0.700"},
        {"modalities": "audio \u2013 image", "pairs": "vqa vs audio_qa 0.300, caption vs audio_qa 0.400",
         "iou": "0.350"},
        {"modalities": "image \u2013 image", "pairs": "vqa vs caption 0.600", "iou": "0.600"}]
    assert _modality_pairs({"task_iou": subnet["task_iou"][:1]}) == []  # one modality: no such table
