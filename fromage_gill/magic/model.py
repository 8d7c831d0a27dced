"""A plain causal LM + a full CLIP, both frozen (MAGIC's own setting): zero-shot captions and image-grounded text.

``load_magic("magic-mscoco")`` builds one from a preset; ``MagicModel.generate(images, prompt)`` decodes with
``search.magic_search`` over ``search.hf_step(lm)``, guided by ``clip.ClipGuide``. No layer is trained.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..backbones import load_lm, load_tokenizer
from ..config import MagicConfig, MagicDecoding, load_config
from ..devices import default_device, default_dtype, parse_dtype
from ..images import load_image
from .clip import ClipGuide, load_clip
from .search import hf_step, magic_search, resolve_decoding

logger = logging.getLogger(__name__)


@dataclass
class MagicResult:
    text: str  # the continuation, special tokens removed
    token_ids: list[int]  # the chosen tokens (a stop token excluded)
    prompt: str  # the LM text the continuation follows
    settings: MagicDecoding


@dataclass
class MagicModel:
    """A plain causal LM + a full CLIP, frozen: zero-shot captioning and image-grounded text generation."""

    config: MagicConfig
    lm: nn.Module
    tokenizer: Any
    clip: ClipGuide
    device: torch.device
    dtype: torch.dtype

    def stream(
        self,
        images: Sequence[Image.Image | str] = (),
        prompt: str = "",
        *,
        decoding: str = "magic",
        k: int | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        max_new_tokens: int | None = None,
    ) -> Iterator[int]:
        """Yield token ids as they are chosen. ``prompt`` fills the preset's prompt template."""
        settings = resolve_decoding(
            decoding, self.config.decoding, k=k, alpha=alpha, beta=beta, max_new_tokens=max_new_tokens
        )
        if settings.beta > 0 and not images:
            raise ValueError(
                f"decoding={decoding!r} needs an image (beta={settings.beta} steers the text towards "
                f"it): pass at least one, or use --decoding contrastive / greedy for text only"
            )
        clip_logits = self.clip.logits_fn([load_image(i) for i in images]) if settings.beta > 0 else None
        prompt_ids = self.prompt_ids(prompt)
        limit = getattr(self.lm.config, "max_position_embeddings", None)
        if limit is not None and prompt_ids.shape[1] + settings.max_new_tokens > limit:
            raise ValueError(
                f"the prompt ({prompt_ids.shape[1]} tokens) plus max_new_tokens "
                f"({settings.max_new_tokens}) exceeds the LM's {limit} positions; shorten either"
            )
        step = hf_step(self.lm)
        with torch.no_grad():
            start = step(prompt_ids, None)
        return magic_search(
            step, start, settings, decode=self.tokenizer.decode, clip_logits=clip_logits, stop_ids=self.stop_ids
        )

    def generate(
        self,
        images: Sequence[Image.Image | str] = (),
        prompt: str = "",
        *,
        decoding: str = "magic",
        k: int | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        max_new_tokens: int | None = None,
    ) -> MagicResult:
        settings = resolve_decoding(
            decoding, self.config.decoding, k=k, alpha=alpha, beta=beta, max_new_tokens=max_new_tokens
        )
        ids = list(
            self.stream(images, prompt, decoding=decoding, k=k, alpha=alpha, beta=beta, max_new_tokens=max_new_tokens)
        )
        text = " ".join(self.tokenizer.decode(ids, skip_special_tokens=True).split())
        return MagicResult(text=text, token_ids=ids, prompt=self.config.prompt(prompt), settings=settings)

    def prompt_ids(self, prompt: str = "") -> torch.Tensor:
        """(1, T) ids of the filled prompt template. An empty prompt starts from the BOS token."""
        text = self.config.prompt(prompt)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if not ids:
            if self.tokenizer.bos_token_id is None:
                raise ValueError(
                    f"{self.config.name}: the prompt is empty and the tokenizer has no BOS token; pass a prompt"
                )
            ids = [self.tokenizer.bos_token_id]
        return torch.tensor([ids], device=self.lm.get_input_embeddings().weight.device)

    @property
    def stop_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []


def load_magic(
    name_or_path: str | MagicConfig = "magic-mscoco",
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    lm: str | None = None,
    clip: str | None = None,
) -> MagicModel:
    """A MAGIC preset / config file (kind "magic"), or a ``MagicConfig``. ``lm`` / ``clip``: override a component's
    source with a local directory or another Hub id. The published LMs and CLIP come from the Hub (cached)."""
    cfg = name_or_path if isinstance(name_or_path, MagicConfig) else load_config(name_or_path)
    if not isinstance(cfg, MagicConfig):
        raise ValueError(
            f"{name_or_path!r} is a {cfg.kind!r} model, not a MAGIC preset; use load_pipeline for it, "
            f"or one of the magic presets (fromage-gill presets)"
        )
    if lm:
        cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, source=lm, config=None))
    if clip:
        cfg = dataclasses.replace(cfg, clip=dataclasses.replace(cfg.clip, source=clip, config=None))
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) or default_dtype(device)
    logger.info("loading %s: language model %s", cfg.name, cfg.lm.source)
    tokenizer = load_tokenizer(cfg.lm)
    model = load_lm(cfg.lm, tokenizer, dtype=dtype, device=device, seed=cfg.seed)
    logger.info("loading %s: CLIP %s", cfg.name, cfg.clip.source)
    guide = load_clip(cfg.clip, device=device, dtype=dtype, seed=cfg.seed)
    return MagicModel(config=cfg, lm=model, tokenizer=tokenizer, clip=guide, device=device, dtype=dtype)
