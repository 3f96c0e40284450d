"""The model seam: what the runners and trainers load, on which device and in which dtype.

``load_llm`` loads a frozen causal LM and its tokenizer only through ``from_pretrained`` (a
folder this pipeline wrote, or a hub name at paper scale). A multimodal model turns a batch of
examples into prompt embeddings for that LM: ``MapperModel`` is today's (cached encoder
features -> the trained mapper's soft prompt, then the text prompt). Another family (LLaVA-1.5,
whose projector merges image features into the prompt: ``mmskip.skipping.adapters.
llava_inputs_embeds``) fits by providing the same three members, ``llm``, ``tokenizer`` and
``prompt_batches(example_set, batch_size)``; the runner never looks inside it. Every tensor
made here follows the LM's device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmskip.features.cache import load_features
from mmskip.mapper.model import Mapper, prefix_batch


def load_llm(name_or_path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The frozen causal LM and its tokenizer, only through ``from_pretrained``, on ``device``."""
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **({"torch_dtype": dtype} if dtype else {}))
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval().requires_grad_(False), tokenizer


class MapperModel:
    """Cached encoder features -> mapper soft prompt, then the text prompt, into the frozen LLM."""

    def __init__(self, llm, tokenizer, mapper: Mapper, features: torch.Tensor, row_of: dict[int, int]):
        self.llm, self.tokenizer, self.mapper = llm, tokenizer, mapper
        self.features, self.row_of = features, row_of

    @classmethod
    def load(cls, llm, tokenizer, mapper_dir: Path, features: Path, split: str, blind: bool = False) -> "MapperModel":
        """``blind`` zeroes the mapper's visual input: how much the model relies on the image."""
        feats, row_of = load_features(features, split)
        if blind:
            feats = torch.zeros_like(feats)
        device = llm.get_input_embeddings().weight.device
        return cls(llm, tokenizer, Mapper.from_pretrained(mapper_dir).to(device).eval(), feats, row_of)

    def with_mapper(self, mapper: Mapper, llm=None, tokenizer=None) -> "MapperModel":
        """The same features with another mapper (and LLM): a trained variant."""
        llm = llm if llm is not None else self.llm
        mapper = mapper.to(llm.get_input_embeddings().weight.device)
        return MapperModel(llm, tokenizer if tokenizer is not None else self.tokenizer, mapper, self.features,
                           self.row_of)

    def visual(self, image_ids: list[int]) -> torch.Tensor:
        rows = torch.tensor([self.row_of[i] for i in image_ids])
        return self.features[rows].to(self.llm.get_input_embeddings().weight.device)  # (B, T, D)

    @torch.no_grad()
    def prompt_batches(self, ex, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Left-padded (inputs_embeds, attention_mask) batches: soft prompt then text prompt."""
        embed = self.llm.get_input_embeddings()
        batches = []
        for s in range(0, len(ex.examples), batch_size):
            soft = self.mapper(self.visual(ex.image_ids[s : s + batch_size]), embed.weight)  # (B, K, D)
            embeds, mask, _ = prefix_batch(soft, ex.prompt_ids[s : s + batch_size], None, embed,
                                           self.tokenizer.pad_token_id, padding_side="left")
            batches.append((embeds, mask))
        return batches
