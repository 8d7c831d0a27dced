"""A plain causal LM + a full CLIP, both frozen (MAGIC's own setting): zero-shot captions and image-grounded text.

``load_magic("magic-mscoco")`` builds one from a preset; ``MagicModel.generate(images, prompt)`` decodes with
``search.magic_search`` over ``search.hf_step(lm)``, guided by ``clip.ClipGuide``. No layer is trained.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..backbones import input_embeddings, load_lm, load_tokenizer
from ..config import MagicConfig, MagicDecoding, load_config
from ..devices import default_device, parse_dtype
from ..images import load_image
from .clip import ClipGuide, load_clip
from .search import MagicStep, hf_step, magic_search, resolve_decoding
from .simctg import START_TOKEN

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass
class MagicResult:
    text: str  # the continuation as the reference prints it (MagicModel.text)
    token_ids: list[int]  # the chosen tokens (a stop token excluded)
    prompt: str  # the LM text the continuation follows
    settings: MagicDecoding  # what ran: max_new_tokens is the budget left by max_length, if it was less
    steps: list[MagicStep] = field(default_factory=list)  # per step: the candidates, their terms and scores


def story_cut(text: str, sentences: int) -> str:
    """The reference's story post-processing (``parse_sentences``): the first ``sentences`` pieces between full
    stops, joined again; with more pieces than that it ends with a full stop, with that many or fewer the final
    full stop is dropped (so "A. B." becomes "A. B")."""
    pieces = text.split(".")
    kept = ".".join(pieces[:sentences]).strip(".")
    return kept + "." if len(pieces) > sentences else kept.strip()


@dataclass
class MagicModel:
    """A plain causal LM + a full CLIP, frozen: zero-shot captioning and image-grounded text generation."""

    config: MagicConfig
    lm: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
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
        max_length: int | None = None,
        trace: list[MagicStep] | None = None,
    ) -> Iterator[int]:
        """Yield token ids as they are chosen. ``prompt`` fills the preset's prompt template. ``trace``: a list
        that gets each step's ``MagicStep``."""
        settings = resolve_decoding(
            decoding, self.config.decoding, k=k, alpha=alpha, beta=beta, max_new_tokens=max_new_tokens
        )
        if settings.beta > 0 and not images:
            raise ValueError(
                f"decoding={decoding!r} needs an image (beta={settings.beta} steers the text towards "
                f"it): pass at least one, or use --decoding contrastive / greedy for text only"
            )
        prompt_ids = self.prompt_ids(prompt)
        settings = self.budget(settings, prompt_ids.shape[1], max_length)
        clip_logits = self.clip.logits_fn([load_image(i) for i in images]) if settings.beta > 0 else None
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
            step,
            start,
            settings,
            decode=lambda ids: str(self.tokenizer.decode(ids)),  # one sequence in, one str out
            clip_logits=clip_logits,
            stop_ids=self.stop_ids,
            trace=trace,
        )

    def budget(self, settings: MagicDecoding, prompt_len: int, max_length: int | None = None) -> MagicDecoding:
        """``settings`` with max_new_tokens cut to what ``max_length`` (or the preset's) leaves after the prompt,
        as the reference's ``decoding_len - prefix_len``."""
        limit = max_length if max_length is not None else settings.max_length
        if limit is None:
            return settings
        if limit <= prompt_len:
            raise ValueError(
                f"max_length {limit} counts the prompt, which is {prompt_len} tokens already: nothing is left to "
                f"generate; give a shorter prompt or a larger max_length"
            )
        return dataclasses.replace(settings, max_new_tokens=min(settings.max_new_tokens, limit - prompt_len))

    def text(self, token_ids: Sequence[int]) -> str:
        """The continuation's text as the reference prints it: the caption LMs' start token dropped wherever it
        appears; decoded with transformers' old default clean-up of spaces (" ." -> "."; the reference pinned
        transformers 4.7); a caption with its runs of spaces made one, a story cut to its first sentences."""
        start = self.tokenizer.convert_tokens_to_ids(START_TOKEN) if START_TOKEN in self.tokenizer.get_vocab() else -1
        ids = [t for t in token_ids if t != start]
        text = str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True))
        text = text.replace(START_TOKEN, "")  # spelled by ordinary tokens, where the tokenizer has no such token
        if self.config.story_sentences is not None:
            return story_cut(text.strip(), self.config.story_sentences)
        return " ".join(text.split())

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
        max_length: int | None = None,
    ) -> MagicResult:
        """Decode a continuation of ``prompt`` guided by ``images``; the result has the text, the tokens and each
        step's candidates and scores (``MagicResult.steps``)."""
        settings = resolve_decoding(
            decoding, self.config.decoding, k=k, alpha=alpha, beta=beta, max_new_tokens=max_new_tokens
        )
        settings = self.budget(settings, self.prompt_ids(prompt).shape[1], max_length)
        steps: list[MagicStep] = []
        ids = list(
            self.stream(
                images,
                prompt,
                decoding=decoding,
                k=k,
                alpha=alpha,
                beta=beta,
                max_new_tokens=max_new_tokens,
                max_length=max_length,
                trace=steps,
            )
        )
        return MagicResult(
            text=self.text(ids), token_ids=ids, prompt=self.config.prompt(prompt), settings=settings, steps=steps
        )

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
        return torch.tensor([ids], device=input_embeddings(self.lm).weight.device)

    @property
    def stop_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else []


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
    # fp32 on every device: the paper's figures are fp32 runs, and bf16 changes which candidate wins where scores
    # are close (MAGIC's models are small: GPT-2 small and CLIP ViT-B/32)
    dtype = parse_dtype(dtype) or torch.float32
    if dtype != torch.float32:
        logger.warning(
            "%s in %s: MAGIC's published results are fp32 runs and lower precision changes some outputs; "
            "use dtype fp32 (--dtype fp32) to reproduce them",
            cfg.name,
            str(dtype).removeprefix("torch."),
        )
    logger.info("loading %s: language model %s", cfg.name, cfg.lm.source)
    tokenizer = load_tokenizer(cfg.lm)
    model = load_lm(cfg.lm, tokenizer, dtype=dtype, device=device, seed=cfg.seed)
    logger.info("loading %s: CLIP %s", cfg.name, cfg.clip.source)
    guide = load_clip(cfg.clip, device=device, dtype=dtype, seed=cfg.seed)
    return MagicModel(config=cfg, lm=model, tokenizer=tokenizer, clip=guide, device=device, dtype=dtype)
