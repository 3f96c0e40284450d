"""Pretrain a tiny OPT-architecture causal LM on scene text only (no pixels).

The text is ``<description> <prompt> <target></s>``: a scene description followed by a
question and its answer, or by a caption. A model pretrained on bare question-answer text
learns to ignore any prefix; one that must read a description to answer learns to use its
context, which is what the mapper's soft prompt later feeds it.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

from mmskip.foundation.text import Document, PromptsConfig, Segment, corpus, documents
from mmskip.data.scenes import COLORS, COLUMN_LETTERS, ROW_LETTERS, SHAPES, SIZES
from mmskip.data.clips import MOTIONS
from mmskip.data.sounds import LOUDNESS, PITCHES, TIMBRES
from mmskip.io import atomic_dir, write_json
from mmskip.tasks import VQA, get_task
from mmskip.training import Trainer
from mmskip.params import LLMConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedDocument:
    context: list[int]
    questions: list[tuple[list[int], list[int]]]  # (prompt ids, target ids + eos)
    captions: list[tuple[list[int], list[int]]]


def encode_documents(tokenizer, docs: list[Document], caption_prompt: str) -> list[EncodedDocument]:
    """Tokenise every piece once; words keep one tokenisation thanks to the prefix space."""
    pieces = sorted({d.context for d in docs} | {p for d in docs for p, _ in d.pairs})
    targets = sorted({t for d in docs for _, t in d.pairs})
    ids = dict(zip(pieces, tokenizer(pieces, add_special_tokens=False)["input_ids"]))
    tids = dict(zip(targets, tokenizer([f" {t}" for t in targets], add_special_tokens=False)["input_ids"]))
    eos = [tokenizer.eos_token_id]
    out = []
    for d in docs:
        pairs = [(p, (ids[p], tids[t] + eos)) for p, t in d.pairs]
        out.append(EncodedDocument(ids[d.context], [x for p, x in pairs if p != caption_prompt],
                                   [x for p, x in pairs if p == caption_prompt]))
    return out


def assemble(doc: EncodedDocument, rng: np.random.Generator) -> tuple[list[int], list[bool]]:
    """Description, then all its questions and one of its captions in random order.

    Returns token ids and a mask of the tokens that carry loss (answers, captions, eos): the
    description is random by construction and the questions are given, so the loss sits on
    what must be read off the description.
    """
    pairs = list(doc.questions)
    if doc.captions:
        pairs.append(doc.captions[int(rng.integers(len(doc.captions)))])
    ids, loss = list(doc.context), [False] * len(doc.context)
    for i in rng.permutation(len(pairs)):
        prompt, target = pairs[int(i)]
        ids += prompt + target
        loss += [False] * len(prompt) + [True] * len(target)
    return ids, loss


def _batch(rows: list[tuple[list[int], list[bool]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels (-100 where no loss)."""
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, loss) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(r)] = ids[i, : len(r)].masked_fill(~torch.tensor(loss), -100)
    return ids, mask, labels


class ComposedEmbedding(torch.nn.Module):
    """Token embeddings in which each scene word is the sum of the words it is made of.

    ``largeredcircle`` is embedded as E[large] + E[red] + E[circle], ``nored`` as E[no] + E[red]
    and a cell word ``bh`` as C[column b] + R[row h]; a note of the sounds, ``loudhighpulse``, as
    E[loud] + E[high] + E[pulse]; an object of the clips, ``bluesquareleft``, as E[blue] + E[square] + E[left];
    every other token has its own vector. One token per object keeps
    lookups a single attention step for a tiny LLM, and the composed embedding keeps its
    input space linear in the attributes, so a mapper can write an object by a linear
    readout. Used during pretraining only: ``materialise`` gives the plain (V, D) matrix an
    ``OPTForCausalLM`` saves and loads like any other.
    """

    def __init__(self, tokenizer, dim: int, init_std: float):
        super().__init__()
        vocab = len(tokenizer)
        extra = len(COLUMN_LETTERS) + len(ROW_LETTERS)
        self.table = torch.nn.Parameter(torch.randn(vocab + extra, dim) * init_std)
        parts = [[v] for v in range(vocab)]
        word = {t.lstrip("Ġ"): i for t, i in tokenizer.get_vocab().items() if t.startswith("Ġ")}
        # a scene's object (size, colour, shape), a clip's (colour, shape, motion) and a sound's note (loudness,
        # pitch, timbre): one word of three
        for words in (*itertools.product(SIZES, COLORS, SHAPES), *itertools.product(COLORS, SHAPES, MOTIONS),
                      *itertools.product(LOUDNESS, PITCHES, TIMBRES)):
            if "".join(words) in word and all(w in word for w in words):
                parts[word["".join(words)]] = [word[w] for w in words]
        for color in COLORS:
            if f"no{color}" in word and "no" in word:
                parts[word[f"no{color}"]] = [word["no"], word[color]]
        for c, col in enumerate(COLUMN_LETTERS):
            for r, row in enumerate(ROW_LETTERS):
                if f"{col}{row}" in word:
                    parts[word[f"{col}{row}"]] = [vocab + c, vocab + len(COLUMN_LETTERS) + r]
        self.num_composed = sum(len(p) > 1 for p in parts)
        width = max(map(len, parts))
        self.register_buffer("index", torch.tensor([p + [0] * (width - len(p)) for p in parts]))
        self.register_buffer("weight", torch.tensor([[1.0] * len(p) + [0.0] * (width - len(p)) for p in parts]))

    def materialise(self) -> torch.Tensor:
        # an embedding lookup, not the gather table[index]: the gather's backward accumulates into the table from
        # both threads in no fixed order, so two pretrainings gave different bytes; this one's is reproducible
        return (torch.nn.functional.embedding(self.index, self.table) * self.weight[..., None]).sum(1)  # (V, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.materialise())


def target_loss(model, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss of ``model(labels=...)``, with logits only where there are labels.

    Loss sits on about a tenth of the tokens (answers, captions), so projecting only those
    hidden states onto the vocabulary saves the rest of the output layer's work. Works for
    any ``*ForCausalLM`` with ``get_decoder`` (OPT, LLaMA, ...).
    """
    hidden = model.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[keep]).float()  # the loss in float32 whatever the LLM's dtype
    return torch.nn.functional.cross_entropy(logits, target[keep])


@torch.no_grad()
def perplexity(model, rows: list[tuple[list[int], list[bool]]], pad_id: int, batch_size: int = 128) -> float:
    """Perplexity of the target tokens (answers, captions) given description and prompt."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        ids, mask, labels = _batch(rows[start : start + batch_size], pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        total += nll.item()
        count += int((target != -100).sum())
    return math.exp(total / count)


@torch.no_grad()
def text_only_hits(model, tokenizer, segments: list[Segment], batch_size: int = 128) -> int:
    """How many answers greedy decoding matches exactly given the true description (the LLM's ceiling)."""
    model.eval()
    tokenizer.padding_side = "left"
    hits = 0
    for start in range(0, len(segments), batch_size):
        chunk = segments[start : start + batch_size]
        enc = tokenizer([f"{s.context} {s.prompt}" for s in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += sum(t.strip() == s.target for t, s in zip(texts, chunk))
    return hits


def pretrain_llm(scenes: Path, tokenizer_dir: Path, out: Path, metrics: Path, seed: int,
                 cfg: LLMConfig, prompts: PromptsConfig, generated: Mapping[str, Path] | None = None) -> dict:
    """On the texts of the scenes and, where given, of the generated clips and sounds
    (``mmskip.foundation.text.corpus``)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train = encode_documents(tokenizer, documents(corpus(scenes, prompts, generated=generated)),
                             prompts.caption_prompt)
    val_segments = corpus(scenes, prompts, "val", generated)
    val_rows = [assemble(d, np.random.default_rng(seed)) for d in
                encode_documents(tokenizer, documents(val_segments), prompts.caption_prompt)]
    # Tokens of a training document without its caption (batches are bucketed by this) and with
    # its longest caption (what assemble can produce at most).
    lengths = np.array([len(d.context) + sum(len(p) + len(t) for p, t in d.questions) for d in train])
    longest_captions = np.array([max((len(p) + len(t) for p, t in d.captions), default=0) for d in train])
    longest = max([int((lengths + longest_captions).max())] + [len(r) for r, _ in val_rows])
    if longest > cfg.max_positions:
        raise ValueError(f"max_positions={cfg.max_positions} is shorter than the longest text ({longest} tokens)")
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        ffn_dim=cfg.ffn_dim, num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
        word_embed_proj_dim=cfg.hidden_size, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        do_layer_norm_before=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model = OPTForCausalLM(config)
    if cfg.composed_embeddings:
        embedding = ComposedEmbedding(tokenizer, cfg.hidden_size, config.init_std)
        model.get_input_embeddings().requires_grad_(False)  # replaced by `embedding` until saved
        params = [p for p in model.parameters() if p.requires_grad] + list(embedding.parameters())
    else:
        embedding = model.get_input_embeddings()
        params = list(model.parameters())
    noise_rng = torch.Generator().manual_seed(seed)
    modules = {"llm": model, **({"embedding": embedding} if cfg.composed_embeddings else {})}
    trainer = Trainer(params, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.weight_decay, rng, betas=(0.9, 0.95),
                      desc="pretrain llm", modules=modules, generators=[noise_rng])
    log.info("LLM: %d parameters, %d training documents, %d steps", model.num_parameters(), len(train), cfg.steps)
    # Batches come from buckets of documents of similar length, so little of a batch is padding.
    by_length = np.argsort(lengths, kind="stable")
    if len(train) < cfg.batch_size:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {len(train)} training documents")
    buckets = np.array_split(by_length, max(1, min(16, len(train) // cfg.batch_size)))

    def step_loss(step: int) -> torch.Tensor:
        bucket = buckets[int(rng.integers(len(buckets)))]
        idx = rng.choice(bucket, size=cfg.batch_size, replace=False)
        ids, mask, labels = _batch([assemble(train[i], rng) for i in idx], tokenizer.pad_token_id)
        embeds = embedding(ids)  # (B, T, D)
        if cfg.context_noise:
            context = torch.zeros(ids.shape, dtype=torch.bool)
            for row, i in enumerate(idx):
                context[row, : len(train[i].context)] = True
            scale = cfg.context_noise * embeds.detach().pow(2).mean().sqrt()
            embeds = embeds + scale * torch.randn(embeds.shape, generator=noise_rng) * context[..., None]
        return target_loss(model, embeds, mask, labels)

    start = time.time()
    model.train()
    losses = trainer.fit(step_loss)
    seconds = time.time() - start
    if cfg.composed_embeddings:
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(embedding.materialise())
        model.get_input_embeddings().requires_grad_(True)
    vqa_val = [s for s in val_segments if get_task(s.task).format is VQA]  # short answers
    # each task's questions decoded once: the overall figure is their total
    per_task = {task: [s for s in vqa_val if s.task == task] for task in sorted({s.task for s in vqa_val})}
    hits = {task: text_only_hits(model, tokenizer, segments) for task, segments in per_task.items()}
    result = {
        "params": model.num_parameters(),
        "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                     "ffn_dim", "vocab_size", "max_position_embeddings")},
        "steps": cfg.steps,
        "final_train_loss": float(np.mean(losses[-50:])),
        "heldout_perplexity": perplexity(model, val_rows, tokenizer.pad_token_id),
        "heldout_text_only_vqa_exact_match": sum(hits.values()) / max(1, len(vqa_val)),
    }
    if len(per_task) > 1:  # the sounds' questions beside the scenes'
        result["heldout_text_only_exact_match_per_task"] = {
            task: hits[task] / len(segments) for task, segments in per_task.items()}
    log.info("LLM result after %.1f s: %s", seconds, result)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_json(metrics, result)
    return result
