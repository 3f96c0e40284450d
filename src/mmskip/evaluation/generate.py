"""Batched generation with plain Hugging Face ``generate``: KV cache, left padding, greedy or beam."""

from __future__ import annotations

import torch


def answers(tokenizer, tokens: torch.Tensor) -> list[str]:
    """The new tokens of each row as text, special tokens dropped, stripped: the predictions scored."""
    return [t.strip() for t in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


@torch.no_grad()
def generate(model, tokenizer, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
             num_beams: int = 1) -> list[str]:
    """Decode one answer per row of a left-padded (inputs_embeds, attention_mask) batch; stripped texts."""
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                         num_beams=num_beams, do_sample=False, use_cache=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return answers(tokenizer, out)
