"""The mapper: encoder tokens -> a soft prompt of K vectors in the LLM's embedding space.

As in the paper (Shukor & Cord 2024, arXiv 2410.09454, following eP-ALM/DePALM): encoder
tokens are projected to the mapper width, concatenated with K learnable query tokens, run
through an L-layer transformer, and the K query outputs are projected to the LLM width and
prepended to the text embeddings of a frozen LLM.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass
class MapperConfig:
    encoder_dim: int = 96  # width of the cached encoder tokens
    llm_dim: int = 128  # width of the LLM's input embeddings
    num_query_tokens: int = 10  # K (paper: 10)
    num_layers: int = 5  # L (paper: 5)
    hidden_size: int = 256  # mapper width (paper: 256)
    num_heads: int = 8  # (paper: 8)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.num_query_tokens < 1 or self.num_layers < 1:
            raise ValueError(f"num_query_tokens={self.num_query_tokens}, num_layers={self.num_layers}: "
                             "both must be >= 1")


class Mapper(nn.Module):
    def __init__(self, cfg: MapperConfig):
        super().__init__()
        self.config = cfg
        self.input_proj = nn.Linear(cfg.encoder_dim, cfg.hidden_size)
        self.queries = nn.Parameter(torch.randn(cfg.num_query_tokens, cfg.hidden_size) * 0.02)
        # Separately constructed layers (nn.TransformerEncoder would deep-copy one initialisation).
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.hidden_size, cfg.num_heads, 4 * cfg.hidden_size, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.output_proj = nn.Linear(cfg.hidden_size, cfg.llm_dim)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        """(B, T, encoder_dim) encoder tokens -> (B, K, llm_dim) soft prompt."""
        B = visual.shape[0]
        x = torch.cat([self.input_proj(visual), self.queries.expand(B, -1, -1)], dim=1)  # (B, T+K, H)
        for layer in self.layers:
            x = layer(x)
        return self.output_proj(self.norm(x[:, -self.config.num_query_tokens:]))  # (B, K, D)

    def save_pretrained(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=1, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, folder: Path) -> "Mapper":
        folder = Path(folder)
        cfg = MapperConfig(**json.loads((folder / "config.json").read_text()))
        model = cls(cfg)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()


def prefix_batch(soft: torch.Tensor, prompts: list[list[int]], targets: list[list[int]] | None,
                 embed: nn.Embedding, pad_id: int, padding_side: str):
    """Soft prompt + prompt tokens (+ target tokens) as one padded batch of input embeddings.

    Returns ``inputs_embeds`` (B, S, D), ``attention_mask`` (B, S) and ``labels`` (B, S) with
    -100 everywhere except on target tokens. ``padding_side='left'`` for generation.
    """
    B, K, _ = soft.shape
    targets = targets or [[] for _ in prompts]
    rows = [p + t for p, t in zip(prompts, targets)]
    width = K + max(map(len, rows))
    ids = torch.full((B, width - K), pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    labels = torch.full((B, width), -100, dtype=torch.long)
    positions = []
    for i, (row, p) in enumerate(zip(rows, prompts)):
        start = width - K - len(row) if padding_side == "left" else 0  # first text position
        ids[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        positions.append(start)
    text = embed(ids)  # (B, S-K, D)
    parts = []
    for i, (row, p, start) in enumerate(zip(rows, prompts, positions)):
        n = len(row)
        pad_left = start if padding_side == "left" else 0
        seq = torch.cat([text[i, :pad_left], soft[i], text[i, pad_left : pad_left + n], text[i, pad_left + n :]])
        parts.append(seq)
        mask[i, pad_left : pad_left + K + n] = 1
        first_target = pad_left + K + len(p)
        labels[i, first_target : pad_left + K + n] = ids[i, pad_left + len(p) : pad_left + n]
    return torch.stack(parts), mask, labels
