"""The model seam: what the runners and trainers load, on which device and in which dtype.

``load_llm`` loads a frozen causal LM and its tokenizer only through ``from_pretrained`` (a
folder this pipeline wrote, or a hub name at paper scale). A multimodal model turns a batch of
examples into prompt embeddings for that LM: ``MapperModel`` is today's (cached encoder
features -> the trained mapper's soft prompt, then the text prompt). ``LlavaModel`` is another
(LLaVA-1.5 from a hub checkpoint, whose projector merges image features into the prompt:
``mmskip.skipping.adapters.llava_inputs_embeds``): both provide the same three members, ``llm``,
``tokenizer`` and ``prompt_batches(example_set, batch_size)``; the runner never looks inside
them. Device and dtype are arguments of loading; every tensor made here follows the LM's device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmskip.features.cache import load_features
from mmskip.foundation.hub import checkpoint
from mmskip.mapper.model import Mapper, prefix_batch
from mmskip.skipping.adapters import llava_inputs_embeds

# dtypes a model may be loaded in (None: the checkpoint's own, from_pretrained's "auto")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
LLAVA_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"  # LLaVA-1.5's conversation format, one image


def load_llm(name_or_path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The frozen causal LM and its tokenizer, only through ``from_pretrained``, on ``device`` in
    ``dtype`` (None: the checkpoint's own)."""
    name_or_path = checkpoint(name_or_path)  # a reference folder (paper scale): the hub model, offline
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **({"dtype": dtype} if dtype else {}))
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
    def load(cls, llm, tokenizer, mapper_dir: Path, features: Path, split: str) -> "MapperModel":
        """The trained mapper of ``mapper_dir`` on ``split``'s cached features, on the LLM's device."""
        feats, row_of = load_features(features, split)
        device = llm.get_input_embeddings().weight.device
        return cls(llm, tokenizer, Mapper.from_pretrained(mapper_dir).to(device).eval(), feats, row_of)

    def blind(self) -> "MapperModel":
        """The same mapper and LLM with the perceptual input zeroed: how much the model relies on what it perceives."""
        return MapperModel(self.llm, self.tokenizer, self.mapper, torch.zeros_like(self.features), self.row_of)

    def with_mapper(self, mapper: Mapper, llm=None, tokenizer=None) -> "MapperModel":
        """The same features with another mapper (and LLM): a trained variant."""
        llm = llm if llm is not None else self.llm
        mapper = mapper.to(llm.get_input_embeddings().weight.device)
        return MapperModel(llm, tokenizer if tokenizer is not None else self.tokenizer, mapper, self.features,
                           self.row_of)

    def visual(self, image_ids: list[int]) -> torch.Tensor:
        """The cached tokens of ``image_ids`` on the model's device, in the mapper's dtype (B, T, D)."""
        rows = torch.tensor([self.row_of[i] for i in image_ids])
        return self.features[rows].to(self.llm.get_input_embeddings().weight.device, self.mapper.dtype)

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


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` this machine has, or a ValueError naming the value."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device={device!r}: not a torch device ({err})") from None
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise ValueError(f"device={device!r}: not available on this machine ({err})") from None
    return dev


def runtime(cfg) -> tuple[torch.device, torch.dtype | None]:
    """The device and dtype of params' ``runtime`` section, checked on this machine before any work
    (``cuda`` where torch sees no GPU is a ValueError naming it)."""
    return resolve_device(cfg.device), resolve_dtype(cfg.dtype)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype`` (a torch dtype or its name) as a torch dtype, None kept (the checkpoint's own)."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype={dtype!r}: allowed {sorted(DTYPES)} (or the torch dtypes) or None (the checkpoint's)")


class LlavaModel:
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): the image enters the LM through its projector.

    - ``llm`` is the whole ``LlavaForConditionalGeneration``; the skip engine drives its LLaMA
      language model (``model.model.language_model`` and ``lm_head``, through
      ``LlamaAdapter.for_llava``), so nothing is copied and the vision tower and projector are
      used only here, to build the prompt.
    - ``images`` maps an image id to an image the checkpoint's image processor accepts (a PIL
      image, an (H, W, 3) uint8 array, ...). Pixels are always made by that processor (a
      ``CLIPImageProcessor`` for LLaVA-1.5), never given ready-made, so the pipeline cannot feed
      a normalisation the model was not trained with.
    - The prompt: each example's prompt ids are decoded back to text and put into ``template``
      (LLaVA-1.5's ``"USER: <image>\\n{prompt} ASSISTANT:"``), and the checkpoint's
      ``LlavaProcessor`` turns that string and the image into input ids (``<image>`` expanded to
      one token per image feature, as the model expects), an attention mask and pixel values,
      exactly as for ``LlavaForConditionalGeneration.generate``. The whole string is tokenised at
      once, as LLaVA was trained, rather than gluing separately tokenised pieces together.
    - ``prompt_batches`` then writes the projected image features into the image-token positions
      with the model's own ``get_image_features`` and ``get_placeholder_mask``
      (:func:`mmskip.skipping.adapters.llava_inputs_embeds`).

    One image per example; the checkpoint folder must hold the processor (``processor_config.json``
    with ``patch_size`` and ``vision_feature_select_strategy``, as the llava-hf checkpoints do).
    """

    def __init__(self, llm, processor, images, template: str = LLAVA_TEMPLATE):
        if "{prompt}" not in template or template.count(processor.image_token) != 1:
            raise ValueError(f"template={template!r}: needs '{{prompt}}' and one {processor.image_token!r}")
        self.llm, self.processor, self.images, self.template = llm, processor, images, template
        self.tokenizer = processor.tokenizer

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, images, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, template: str = LLAVA_TEMPLATE) -> "LlavaModel":
        """Model and processor only through ``from_pretrained``; the model frozen on ``device`` in
        ``dtype`` (None: the checkpoint's own)."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration  # hub scale only

        device, dtype = resolve_device(device), resolve_dtype(dtype)
        model = LlavaForConditionalGeneration.from_pretrained(name_or_path, **({"dtype": dtype} if dtype else {}))
        processor = AutoProcessor.from_pretrained(name_or_path)
        if processor.tokenizer.pad_token_id is None:
            processor.tokenizer.pad_token = processor.tokenizer.eos_token
        return cls(model.to(device).eval().requires_grad_(False), processor, images, template)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def prompts(self, prompt_ids: list[list[int]]) -> list[str]:
        """The template around each decoded text prompt."""
        return [self.template.format(prompt=self.tokenizer.decode(ids).strip()) for ids in prompt_ids]

    def inputs(self, prompt_ids: list[list[int]], image_ids: list[int]) -> dict[str, torch.Tensor]:
        """The processor's left-padded ``input_ids``, ``attention_mask`` and ``pixel_values``, on the
        model's device (pixels in the vision tower's dtype)."""
        enc = self.processor(images=[self.images[i] for i in image_ids], text=self.prompts(prompt_ids),
                             padding=True, padding_side="left", return_tensors="pt")
        pixel_dtype = self.llm.model.vision_tower.dtype
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device),
                "pixel_values": enc["pixel_values"].to(self.device, pixel_dtype)}

    @torch.no_grad()
    def prompt_batches(self, ex, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Left-padded (inputs_embeds, attention_mask) batches: the prompt with the image features merged."""
        batches = []
        for s in range(0, len(ex.examples), batch_size):
            enc = self.inputs(ex.prompt_ids[s : s + batch_size], ex.image_ids[s : s + batch_size])
            batches.append((llava_inputs_embeds(self.llm, enc["input_ids"], enc["pixel_values"]),
                            enc["attention_mask"]))
        return batches
