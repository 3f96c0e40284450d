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
    num_visual_tokens: int = 37  # encoder tokens per image (T)
    llm_dim: int = 128  # width of the LLM's input embeddings
    num_query_tokens: int = 10  # K (paper: 10)
    num_layers: int = 5  # L (paper: 5)
    hidden_size: int = 256  # mapper width (paper: 256)
    num_heads: int = 8  # (paper: 8)
    ffn_dim: int = 0  # inner width of each layer's FFN (paper: 512); 0: 4 x hidden_size (configs saved before it)
    # "linear": the paper's projection to the LLM width. "vocab": a softmax over the LLM's
    # vocabulary mixing its (frozen) token embeddings, so every soft token stays inside the
    # span of real words (with the default embedded LLM it scored slightly below "linear").
    output: str = "linear"
    vocab_size: int = 0  # LLM vocabulary size, for output="vocab"

    def __post_init__(self) -> None:
        if self.output not in ("linear", "vocab"):
            raise ValueError(f"output={self.output!r}: allowed 'linear', 'vocab'")
        if self.output == "vocab" and self.vocab_size < 1:
            raise ValueError(f"output='vocab' needs vocab_size >= 1, got {self.vocab_size}")
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
        self.visual_pos = nn.Parameter(torch.zeros(cfg.num_visual_tokens, cfg.hidden_size))  # where each token sits
        self.queries = nn.Parameter(torch.randn(cfg.num_query_tokens, cfg.hidden_size) * 0.02)
        # Separately constructed layers (nn.TransformerEncoder would deep-copy one initialisation).
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.hidden_size, cfg.num_heads, cfg.ffn_dim or 4 * cfg.hidden_size, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size)
        if cfg.output == "vocab":
            self.output_proj = nn.Linear(cfg.hidden_size, cfg.vocab_size)
            return
        self.output_proj = nn.Linear(cfg.hidden_size, cfg.llm_dim)
        # Start the soft prompt near the scale of real token embeddings (norm ~ a few units)
        # rather than nn.Linear's default, which makes it ~10x larger than any word.
        nn.init.normal_(self.output_proj.weight, std=0.02)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, visual: torch.Tensor, token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, encoder_dim) encoder tokens -> (B, K, llm_dim) soft prompt.

        ``token_embeddings`` (V, llm_dim), the LLM's input embedding matrix, is needed for
        ``output="vocab"``.
        """
        B = visual.shape[0]
        if visual.shape[1] != self.config.num_visual_tokens:
            raise ValueError(f"mapper expects {self.config.num_visual_tokens} encoder tokens, got {visual.shape[1]}")
        x = torch.cat([self.input_proj(visual) + self.visual_pos, self.queries.expand(B, -1, -1)], dim=1)  # (B, T+K, H)
        for layer in self.layers:
            x = layer(x)
        out = self.output_proj(self.norm(x[:, -self.config.num_query_tokens:]))  # (B, K, D or V)
        if self.config.output == "vocab":
            if token_embeddings is None:
                raise ValueError("output='vocab' needs the LLM's token_embeddings")
            out = out.softmax(-1) @ token_embeddings.to(out.dtype)  # (B, K, V) @ (V, D) -> (B, K, D)
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.queries.dtype

    def save_pretrained(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))
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
    -100 everywhere except on target tokens. ``padding_side='left'`` for generation: the
    padding comes first, then the soft prompt, then the text.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}: allowed 'left', 'right'")
    B, K, _ = soft.shape
    soft = soft.to(embed.weight.dtype)  # a float32 mapper's prompt into a bfloat16/float16 LLM
    dev = soft.device  # every tensor made here follows the soft prompt's device
    targets = targets or [[] for _ in prompts]
    rows = [p + t for p, t in zip(prompts, targets)]
    lengths = torch.tensor([len(r) for r in rows], device=dev)  # (B,)
    n = int(lengths.max())
    text_ids = torch.full((B, n), pad_id, dtype=torch.long, device=dev)
    target_mask = torch.zeros((B, n), dtype=torch.bool, device=dev)
    for i, (row, p) in enumerate(zip(rows, prompts)):  # text left-aligned in (B, n)
        text_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=dev)
        target_mask[i, len(p) : len(row)] = True
    pad = (n - lengths) if padding_side == "left" else torch.zeros_like(lengths)  # (B,)
    # Output position j of row i holds: padding (j < pad_i), soft token j - pad_i
    # (pad_i <= j < pad_i + K), or text token j - pad_i - K; right padding fills the tail.
    j = torch.arange(K + n, device=dev)[None, :]  # (1, S)
    rel = j - pad[:, None]  # (B, S)
    is_soft = (rel >= 0) & (rel < K)
    text_pos = (rel - K).clamp(0, n - 1)
    is_text = (rel >= K) & (rel - K < lengths[:, None])
    text = embed(text_ids)  # (B, n, D)
    gathered_text = text.gather(1, text_pos[..., None].expand(-1, -1, text.shape[-1]))
    gathered_soft = soft.gather(1, rel.clamp(0, K - 1)[..., None].expand(-1, -1, soft.shape[-1]))
    pad_embed = embed(torch.tensor(pad_id, device=dev))
    embeds = torch.where(is_soft[..., None], gathered_soft, torch.where(is_text[..., None], gathered_text, pad_embed))
    mask = (is_soft | is_text).long()
    labels = torch.where(is_text & target_mask.gather(1, text_pos), text_ids.gather(1, text_pos),
                         torch.full_like(text_pos, -100))
    return embeds, mask, labels
