"""The full CLIP MAGIC steers with: images embedded once, each step's candidate texts scored against them.

``load_clip`` builds one (Hub, directory, or random weights for tests); ``attach_clip`` gives a FROMAGe/GILL
``Pipeline`` one (its ``clip`` field: the pipeline itself holds only CLIP's vision tower), which the generation
engine's "magic" decoding reads back with ``attached_clip``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, cast

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..backbones import image_side, inline_config, train_tiny_tokenizer
from ..config import RANDOM, ClipSpec, ConfigError, MagicConfig, ModelConfig, load_config
from ..hub import from_hub_or_path
from ..images import CLIP_MEAN, CLIP_STD, ImageProcessor
from .search import ClipLogitsFn

if TYPE_CHECKING:
    from transformers import (
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionConfig,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )


class ClipGuide(nn.Module):
    """A frozen full CLIP: images embedded once, then any number of text batches scored against them."""

    def __init__(self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase, processor: ImageProcessor):
        super().__init__()
        model.eval().requires_grad_(False)  # in place
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        text_config = cast("CLIPTextConfig", model.config.text_config)  # a CLIPModel's config holds both towers'
        self.max_length = min(int(tokenizer.model_max_length), int(text_config.max_position_embeddings))

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """N images -> (N, D) L2-normalised projected image embeddings."""
        if not images:
            raise ValueError("no image given: CLIP guidance needs at least one image")
        dtype = self.model.visual_projection.weight.dtype
        pixels = self.processor(list(images)).to(device=self.device, dtype=dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """K texts -> (K, D) L2-normalised projected text embeddings, in one batch."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        pooled = self.model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def text_logits(self, image_embeds: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) image embeddings x K texts -> (K,) logit_scale x cosine, averaged over the N images."""
        scale = self.model.logit_scale.exp().float()
        return (scale * self.embed_texts(texts) @ image_embeds.to(self.device).T).mean(dim=-1)

    def logits_fn(self, images: Sequence[Image.Image]) -> ClipLogitsFn:
        """The per-step scorer for these images (embedded here, once)."""
        image_embeds = self.embed_images(images)
        return lambda texts: self.text_logits(image_embeds, texts)


def tiny_clip_tokenizer(vocab_size: int, model_max_length: int = 77) -> PreTrainedTokenizerFast:
    """The offline tokenizer of a random CLIP: the shipped BPE, ending every text with </s> (CLIP pools at EOS)."""
    from tokenizers.processors import TemplateProcessing

    tok = train_tiny_tokenizer(vocab_size, model_max_length=model_max_length)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {tok.eos_token}", special_tokens=[(tok.eos_token, tok.eos_token_id)]
    )
    return tok


def load_clip(spec: ClipSpec, *, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> ClipGuide:
    """A full CLIP (transformers ``CLIPModel``) from the Hub, a directory, or random weights built from config."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    if spec.source == RANDOM:
        cfg = dict(inline_config(spec))
        torch.manual_seed(seed + 1)
        model = CLIPModel(CLIPConfig(**cfg))
        tokenizer: PreTrainedTokenizerBase = tiny_clip_tokenizer(
            int(cfg["text_config"].get("vocab_size", 512)), int(cfg["text_config"].get("max_position_embeddings", 77))
        )
    else:
        model = from_hub_or_path(
            "CLIP model",
            spec.source,
            lambda s: CLIPModel.from_pretrained(s, revision=spec.revision or "main", dtype=dtype),
        )
        tokenizer = from_hub_or_path(
            "CLIP tokenizer", spec.source, lambda s: AutoTokenizer.from_pretrained(s, revision=spec.revision)
        )
    size = image_side(cast("CLIPVisionConfig", model.config.vision_config).image_size)
    cast(nn.Module, model).to(device=device, dtype=dtype)  # in place (transformers' typing of .to is generation's)
    return ClipGuide(model, tokenizer, ImageProcessor(size=size, mean=CLIP_MEAN, std=CLIP_STD))


# ------------------------------------------------------------------------------------------ on a FROMAGe/GILL pipeline


class ClipHost(Protocol):
    """What ``attach_clip`` needs of a FROMAGe/GILL ``Pipeline``. A protocol, because pipeline.py imports this
    module (its ``clip`` field's type) and magic/ does not import pipeline.py back."""

    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    clip: ClipGuide | None


def attach_clip(pipeline: ClipHost, source: str | ClipSpec | ClipGuide | None = None) -> ClipGuide:
    """Give a FROMAGe/GILL pipeline the full CLIP magic decoding scores with. ``source``: a Hub id or directory of
    a transformers CLIPModel, a MAGIC preset name (its CLIP, e.g. "tiny-magic"), a ClipSpec or a loaded ClipGuide.
    Default: the pipeline's own vision encoder, when it names a full CLIP (openai/clip-vit-large-patch14 does)."""
    if isinstance(source, ClipGuide):
        guide = source
    else:
        if source is None:
            vision = pipeline.config.vision
            if vision.backend != "hf_clip" or vision.source == RANDOM:
                raise ValueError(_no_text_tower(pipeline))
            spec = ClipSpec(source=vision.source, revision=vision.revision)
        elif isinstance(source, ClipSpec):
            spec = source
        else:
            spec = ClipSpec(source=source)
            try:
                preset = load_config(source)
            except ConfigError:
                preset = None
            if isinstance(preset, MagicConfig):
                spec = preset.clip
        guide = load_clip(spec, device=pipeline.device, dtype=pipeline.dtype, seed=pipeline.config.seed)
    pipeline.clip = guide  # a FROMAGe/GILL pipeline holds only CLIP's vision tower; MAGIC needs the full CLIP
    return guide


def attached_clip(pipeline: ClipHost) -> ClipGuide:
    """The full CLIP attached to a pipeline, or a clear error saying how to attach one."""
    guide = pipeline.clip
    if guide is None:
        raise ValueError(_no_text_tower(pipeline))
    return guide


def _no_text_tower(pipeline: ClipHost) -> str:
    src = pipeline.config.vision.source
    hint = "openai/clip-vit-large-patch14" if src == RANDOM else src
    return (
        f"a model with no CLIP text tower cannot use magic decoding; {pipeline.config.name!r} has only CLIP's "
        f"vision encoder ({src}). Pass a full CLIP: fromage_gill.magic.attach_clip(pipeline, {hint!r}) "
        f"(a Hub id or directory of a transformers CLIPModel, or 'tiny-magic' offline; in the app: --clip SOURCE), "
        f"or use decoding='contrastive', which needs no CLIP"
    )
