"""Wanda's calibration inputs: real multimodal forward passes through the trained mapper.

Modes, from the original work: ``prompt`` (soft prompt + text prompt), ``prompt_answer``
(the same followed by the answer or caption), ``text`` (prompt and answer tokens alone, no
soft prompt), and ``only_prompt``: the paper code's own mode (mshukor/ima-lmms,
``DePALM/pruning/data.py`` ``prepare_text_input(only_prompt=True)``), which tokenises an empty
text, so the LLM sees the soft prompt followed by BOS alone. Examples come from the training
split, drawn with the params' seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmskip.compression.names import CALIBRATIONS
from mmskip.features.cache import load_features
from mmskip.foundation.text import PromptsConfig
from mmskip.mapper.model import Mapper, prefix_batch
from mmskip.mapper.train import encode_examples, task_examples


@torch.no_grad()
def calibration_batches(task: str, mode: str, scenes: Path, features: Path, model, tokenizer, mapper: Mapper,
                        prompts: PromptsConfig, num_examples: int, seed: int, batch_size: int = 32):
    """Right-padded (inputs_embeds, attention_mask) batches of ``num_examples`` training examples."""
    if mode not in CALIBRATIONS:
        raise ValueError(f"calibration={mode!r}: allowed {list(CALIBRATIONS)}")
    examples = task_examples(task, scenes, "train", prompts)
    if not 0 < num_examples <= len(examples):
        raise ValueError(f"num_calibration={num_examples}: must be in [1, {len(examples)}] (training examples)")
    pick = np.sort(np.random.default_rng(seed).choice(len(examples), num_examples, replace=False))
    chosen = [examples[int(i)] for i in pick]
    prompt_ids, target_ids = encode_examples(tokenizer, chosen)
    embed = model.get_input_embeddings()
    feats, row_of = load_features(features, "train")
    batches = []
    for s in range(0, num_examples, batch_size):
        p, t = prompt_ids[s : s + batch_size], target_ids[s : s + batch_size]
        if mode == "text":
            rows = [a + b for a, b in zip(p, t)]
            ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            batches.append((embed(ids.to(embed.weight.device)), mask.to(embed.weight.device)))
            continue
        images = torch.tensor([row_of[image_id] for image_id, _, _ in chosen[s : s + batch_size]])
        soft = mapper(feats[images].to(embed.weight.device, getattr(mapper, "dtype", feats.dtype)), embed.weight)
        if mode == "only_prompt":
            if tokenizer.bos_token_id is None:
                raise ValueError("calibration='only_prompt' needs a tokenizer with a BOS token (soft prompt + BOS)")
            p = [[tokenizer.bos_token_id] for _ in p]
        embeds, mask, _ = prefix_batch(soft, p, t if mode == "prompt_answer" else None, embed,
                                       tokenizer.pad_token_id, padding_side="right")
        batches.append((embeds, mask))
    return batches
