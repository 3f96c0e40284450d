"""Byte-level BPE tokenizer trained with Hugging Face `tokenizers` on the scene text corpus.

Saved as a ``PreTrainedTokenizerFast`` so ``AutoTokenizer.from_pretrained`` loads it like a
hub tokenizer. ``add_prefix_space`` makes a word tokenise the same at the start of a text
and after a space, so a prompt tokenised alone matches the prompt inside pretraining text.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmskip.foundation.text import PromptsConfig, corpus
from mmskip.io import atomic_dir
from mmskip.params import TokenizerConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}


def train_tokenizer(scenes: Path, out: Path, cfg: TokenizerConfig, prompts: PromptsConfig,
                    generated: Mapping[str, Path] | None = None) -> PreTrainedTokenizerFast:
    """On the texts of the scenes and, where given, of the generated clips and sounds
    (``mmskip.foundation.text.corpus``)."""
    segments = corpus(scenes, prompts, generated=generated)
    texts = sorted({s.context for s in segments} | {f"{s.prompt} {s.target}" for s in segments})
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    with atomic_dir(out) as tmp:
        fast.save_pretrained(tmp)
    log.info("tokenizer: %d tokens from %d texts", fast.vocab_size, len(texts))
    return fast
