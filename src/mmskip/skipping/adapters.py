"""Per-family adapters: where a decoder keeps its blocks and how one block's parts are called.

The engine runs the blocks itself from these parts, so nothing in the library is patched and
the model behaves as before outside the engine.
"""

from __future__ import annotations

import torch
from torch import nn


class DecoderAdapter:
    """Uniform access to one decoder family; tensors are (B, T, D), q/k/v (B, heads, T, d).

    Subclasses give: ``layers()``; ``embed(input_ids, inputs_embeds)``;
    ``add_positions(h, position_ids, mask, past) -> (h, rotary or None)``; ``head(h) -> logits``;
    and per block ``attn_norm``, ``qkv(layer, x, rotary)``, ``attn_out``, ``ffn_norm``, ``ffn``;
    plus ``num_heads``, ``num_kv_heads``, ``head_dim`` and the attention ``scale``.

    For the paper code's own formulas (``SkipPlan(semantics="official")``) they also give
    ``rotate_key(k, rotary)``, ``official_ffn_input(layer, x)`` and ``official_skip_attn_base(h, x)``;
    :meth:`raw_kv` builds the keys/values the official skip_attn caches.
    """

    family: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float

    def __init__(self, model: nn.Module):
        self.model = model

    def raw_kv_error(self, hidden: int) -> str | None:
        """Why :meth:`raw_kv` cannot split a ``hidden``-wide state into key/value heads, or None."""
        if self.num_kv_heads * self.head_dim != hidden:
            return (f"official skip_attn caches x = norm1(h) split into the key/value heads, which needs "
                    f"num_key_value_heads * head_dim == hidden_size ({self.num_kv_heads} * {self.head_dim} != "
                    f"{hidden}); the paper's code fails on this model")
        return None

    def raw_kv(self, x, rope):
        """Official skip_attn keys and values: ``x`` (B, T, D) split into the key/value heads
        without projection, the keys rotated as the family's keys are (paper code, skip_attn)."""
        B, T, D = x.shape
        error = self.raw_kv_error(D)
        if error:
            raise ValueError(error)
        v = x.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return self.rotate_key(v, rope), v

    def rotate_key(self, k, rope):
        return k

    def official_ffn_input(self, layer, x):
        """The feed-forward input of the official skip_attn and parallel_attn, from ``x = attn_norm(h)``."""
        raise NotImplementedError

    def official_skip_attn_base(self, h, x):
        """What the official skip_attn adds the feed-forward output to."""
        raise NotImplementedError


class OPTAdapter(DecoderAdapter):
    """``OPTForCausalLM`` (pre-LayerNorm models: every OPT except 350m)."""

    def __init__(self, model):
        super().__init__(model)
        self.decoder = model.model.decoder
        cfg = model.config
        if not cfg.do_layer_norm_before:
            raise ValueError("OPT with do_layer_norm_before=False (opt-350m) is not supported: "
                             "skipping assumes pre-LayerNorm blocks")
        self.family = "opt"
        self.num_heads = self.num_kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scale = 1.0  # OPT scales the queries in q_proj's output, as below

    def layers(self):
        return self.decoder.layers

    def embed(self, input_ids=None, inputs_embeds=None):
        return self.decoder.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    def add_positions(self, h, position_ids, mask, past):
        if self.decoder.project_in is not None:
            h = self.decoder.project_in(h)
        return h + self.decoder.embed_positions(mask, past, position_ids=position_ids), None

    def head(self, h):
        if self.decoder.final_layer_norm is not None:
            h = self.decoder.final_layer_norm(h)
        if self.decoder.project_out is not None:
            h = self.decoder.project_out(h)
        return self.model.lm_head(h)

    def attn_norm(self, layer, h):
        return layer.self_attn_layer_norm(h)

    def qkv(self, layer, x, rope):
        a = layer.self_attn
        B, T, _ = x.shape
        q, k, v = a.q_proj(x) * a.scaling, a.k_proj(x), a.v_proj(x)
        return tuple(t.view(B, T, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))

    def attn_out(self, layer, o):
        return layer.self_attn.out_proj(o)

    def ffn_norm(self, layer, h):
        return layer.final_layer_norm(h)

    def ffn(self, layer, x):
        return layer.fc2(layer.activation_fn(layer.fc1(x)))

    def official_ffn_input(self, layer, x):
        return layer.final_layer_norm(x)  # skipping_opt.py: final_layer_norm on the normed x

    def official_skip_attn_base(self, h, x):
        return x  # skipping_opt.py: the residual is the normed x


class LlamaAdapter(DecoderAdapter):
    """A LLaMA decoder given by its parts: ``decoder`` (embed_tokens, layers, norm, rotary_emb),
    ``lm_head`` and the text ``config``; see :meth:`for_causal_lm` and :meth:`for_llava`."""

    def __init__(self, model, decoder, lm_head, config):
        super().__init__(model)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._rotate = apply_rotary_pos_emb
        self.inner = decoder
        self.lm_head = lm_head
        self.family = "llama"
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5

    @classmethod
    def for_causal_lm(cls, model):
        """``LlamaForCausalLM`` (Vicuna)."""
        return cls(model, model.model, model.lm_head, model.config)

    @classmethod
    def for_llava(cls, model):
        """The language model of ``LlavaForConditionalGeneration``; the image features enter
        through ``inputs_embeds`` (see :func:`llava_inputs_embeds`)."""
        text = model.config.text_config
        if text.model_type != "llama":
            raise ValueError(f"LLaVA with text model_type={text.model_type!r}: allowed ['llama']")
        return cls(model, model.model.language_model, model.lm_head, text)

    def layers(self):
        return self.inner.layers

    def embed(self, input_ids=None, inputs_embeds=None):
        return self.inner.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    def add_positions(self, h, position_ids, mask, past):
        return h, self.inner.rotary_emb(h, position_ids)

    def head(self, h):
        return self.lm_head(self.inner.norm(h))

    def attn_norm(self, layer, h):
        return layer.input_layernorm(h)

    def qkv(self, layer, x, rope):
        a = layer.self_attn
        B, T, _ = x.shape
        q = a.q_proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)
        k = a.k_proj(x).view(B, T, self.num_kv_heads, -1).transpose(1, 2)
        v = a.v_proj(x).view(B, T, self.num_kv_heads, -1).transpose(1, 2)
        cos, sin = rope
        q, k = self._rotate(q, k, cos, sin)
        return q, k, v

    def attn_out(self, layer, o):
        return layer.self_attn.o_proj(o)

    def ffn_norm(self, layer, h):
        return layer.post_attention_layernorm(h)

    def ffn(self, layer, x):
        return layer.mlp(x)

    def rotate_key(self, k, rope):
        cos, sin = rope
        return self._rotate(k, k, cos, sin)[1]

    def official_ffn_input(self, layer, x):
        return x  # skipping_llama.py: no post_attention_layernorm

    def official_skip_attn_base(self, h, x):
        return h


def adapter_for(model: nn.Module) -> DecoderAdapter:
    """The adapter of an OPT or LLaMA causal LM, or of LLaVA's (LLaMA) language model."""
    kind = model.config.model_type
    adapters = {"opt": OPTAdapter, "llama": LlamaAdapter.for_causal_lm, "llava": LlamaAdapter.for_llava}
    if kind not in adapters:
        raise ValueError(f"model_type={kind!r}: allowed {sorted(adapters)}")
    return adapters[kind](model)


@torch.no_grad()
def llava_inputs_embeds(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                        **image_kwargs) -> torch.Tensor:
    """The (B, T, D) prompt embeddings ``LlavaForConditionalGeneration`` feeds its language model:
    token embeddings with the projected image features written into the image-token positions.

    Uses the model's own ``get_image_features`` and ``get_placeholder_mask``, as its forward does;
    ``image_kwargs`` (``vision_feature_layer``, ``vision_feature_select_strategy``,
    ``image_sizes``) are passed to ``get_image_features`` and default to the model config.
    """
    llava = model.model
    embeds = llava.get_input_embeddings()(input_ids)
    features = llava.get_image_features(pixel_values=pixel_values, return_dict=True, **image_kwargs).pooler_output
    features = torch.cat(features, dim=0).to(embeds.device, embeds.dtype)
    mask = llava.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=features)
    return embeds.masked_scatter(mask, features)
