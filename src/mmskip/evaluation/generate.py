"""Batched generation from soft prompt + text prompt: KV cache, left padding, greedy or beam."""

from __future__ import annotations

import torch

from mmskip.mapper.model import Mapper, prefix_batch


@torch.no_grad()
def generate(model, tokenizer, mapper: Mapper, visual: torch.Tensor, prompt_ids: list[list[int]],
             max_new_tokens: int, num_beams: int = 1) -> list[str]:
    """Decode one answer per row of ``visual`` (B, T, D) with its prompt; returns stripped texts."""
    soft = mapper(visual, model.get_input_embeddings().weight)  # (B, K, D)
    embeds, mask, _ = prefix_batch(soft, prompt_ids, None, model.get_input_embeddings(),
                                   tokenizer.pad_token_id, padding_side="left")
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                         num_beams=num_beams, do_sample=False, use_cache=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
