"""MAGIC decoding ("Language Models Can See", Su et al. 2022) and contrastive search, as our own KV-cached loop.

At each step, over the LM's top-k next tokens V, choose

    argmax_v  (1 - alpha) * p(v | x)  -  alpha * max_j cos(h_v, h_j)  +  beta * f(v)

``h_v``: the last-layer hidden state of the sequence continued by ``v``; ``h_j``: those of every earlier position,
prompt included (the degeneration penalty of contrastive search); ``f = softmax over V`` of CLIP's image-text logits
(logit_scale x cosine) for the continuation text + ``v``: the generated text without the prompt, its last 60 LM tokens
at most. ``beta = 0`` is contrastive search (SimCTG); ``alpha = beta = 0`` is greedy decoding.

Per step: ONE LM forward over the k candidates (the prefix KV cache expanded k ways; the chosen row is kept, so the
chosen token needs no forward of its own) and ONE CLIP text forward over the k candidate texts. The image
embedding is computed once per image. No layer is trained: any causal LM, any full CLIP.

Two ways in: a plain LM + CLIP (``load_magic("magic-mscoco")`` -> ``MagicModel.generate(images)``), or a
FROMAGe/GILL pipeline guided by the conversation's images (``attach_clip(pipeline, source)`` then the generation
engine's ``decoding="magic"``; contrastive search needs no CLIP).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..backbones import cache_argument, load_lm, load_tokenizer, train_tiny_tokenizer
from ..config import RANDOM, ClipSpec, ConfigError, MagicConfig, MagicDecoding, load_config
from ..devices import default_device, default_dtype, parse_dtype
from ..hub import from_hub_or_path
from ..images import CLIP_MEAN, CLIP_STD, ImageProcessor, load_image

logger = logging.getLogger(__name__)

DECODINGS: tuple[str, ...] = ("magic", "contrastive", "greedy")


# ------------------------------------------------------------------------------------------ the rule


def degeneration_penalty(candidate_hidden: torch.Tensor, context_hidden: torch.Tensor) -> torch.Tensor:
    """(k, d) candidates x (T, d) earlier positions -> (k,) max cosine similarity to any earlier position."""
    cand = F.normalize(candidate_hidden.float(), dim=-1)
    ctx = F.normalize(context_hidden.float().to(cand.device), dim=-1)
    return (cand @ ctx.T).max(dim=-1).values


def magic_scores(probs: torch.Tensor, penalty: torch.Tensor, clip_logits: torch.Tensor | None,
                 alpha: float, beta: float) -> torch.Tensor:
    """(k,) LM probabilities, (k,) degeneration penalties, (k,) CLIP logits or None -> (k,) scores."""
    scores = (1.0 - alpha) * probs.float() - alpha * penalty.float()
    if beta and clip_logits is not None:
        scores = scores + beta * clip_logits.float().to(scores.device).softmax(-1)
    return scores


def continuation_ids(generated: Sequence[int], candidate: int, max_tokens: int) -> list[int]:
    """What CLIP reads for a candidate: the continuation (never the prompt) plus the candidate, last tokens only."""
    return [*generated, int(candidate)][-max_tokens:]


def resolve_decoding(decoding: str, base: MagicDecoding, **overrides: Any) -> MagicDecoding:
    """The settings one decoding mode uses: "magic" (as given), "contrastive" (beta = 0) or "greedy" (k = 1,
    alpha = beta = 0). ``overrides`` (k, alpha, beta, max_new_tokens; None = keep) are validated as a whole."""
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    changes = {name: value for name, value in overrides.items() if value is not None}
    if decoding == "contrastive":
        changes["beta"] = 0.0
    elif decoding == "greedy":
        changes.update(k=1, alpha=0.0, beta=0.0)
    try:
        return dataclasses.replace(base, **changes)
    except ConfigError as e:
        raise ValueError(str(e)) from None


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class LMStep:
    """One forward of the LM: next-token logits at the last position, hidden states of the positions run, cache."""

    logits: torch.Tensor  # (B, V) float32
    hidden: torch.Tensor  # (B, T, d) last layer (after the final norm)
    past_key_values: Any


StepFn = Callable[[torch.Tensor, Any], LMStep]  # (B, 1) token ids, cache -> LMStep
ClipLogitsFn = Callable[[list[str]], torch.Tensor]  # k texts -> (k,) image-text logits


def magic_search(step: StepFn, start: LMStep, settings: MagicDecoding, *, decode: Callable[[list[int]], str],
                 clip_logits: ClipLogitsFn | None = None, stop_ids: Sequence[int] = (),
                 vocab_limit: int | None = None) -> Iterator[int]:
    """Yield the chosen token ids one by one (a stop token ends the loop and is not yielded).

    step: runs the LM on (B, 1) token ids with a cache (see ``hf_step`` / ``grounded_step``).
    start: the prompt's forward (batch 1, ``use_cache=True``); its cache is consumed.
    decode: LM token ids -> text, for CLIP. clip_logits: required when ``settings.beta > 0``.
    vocab_limit: candidates are drawn from the first ``vocab_limit`` ids only (e.g. text tokens, not [IMG]).
    """
    if settings.beta > 0 and clip_logits is None:
        raise ValueError("magic decoding (beta > 0) needs an image to steer towards; pass images, or use "
                         "decoding='contrastive' (beta = 0) for text only")
    if start.logits.shape[0] != 1:
        raise ValueError(f"magic decoding runs one sequence at a time, got a batch of {start.logits.shape[0]}")
    return _search(step, start, settings, decode, clip_logits, {int(t) for t in stop_ids}, vocab_limit)


@torch.no_grad()
def _search(step: StepFn, start: LMStep, settings: MagicDecoding, decode: Callable[[list[int]], str],
            clip_logits: ClipLogitsFn | None, stop: set[int], vocab_limit: int | None) -> Iterator[int]:
    context = start.hidden[0]  # (T, d): every position a candidate is compared with
    logits = start.logits[0]  # (V,)
    cache = start.past_key_values
    generated: list[int] = []
    for _ in range(settings.max_new_tokens):
        if vocab_limit is not None:
            logits = logits[:vocab_limit]
        k = min(settings.k, logits.shape[-1])
        top_logits, top_ids = logits.float().topk(k)  # (k,), sorted: ties go to the likelier token, as published
        probs = (top_logits - logits.float().logsumexp(-1)).exp()

        cache.batch_repeat_interleave(k)  # (1, ...) -> (k, ...): every candidate continues the same prefix
        out = step(top_ids.view(k, 1).to(_device_of(start)), cache)
        cand_hidden = out.hidden[:, -1]  # (k, d)
        penalty = degeneration_penalty(cand_hidden, context) if settings.alpha > 0 else torch.zeros_like(probs)
        guide = None
        if settings.beta > 0:
            texts = [decode(continuation_ids(generated, v, settings.clip_text_max_tokens)) for v in top_ids.tolist()]
            guide = clip_logits(texts)
        scores = magic_scores(probs, penalty, guide, settings.alpha, settings.beta)
        best = int(scores.masked_fill(~torch.isfinite(top_logits), -torch.inf).argmax())  # -inf: never chosen

        token = int(top_ids[best])
        cache = out.past_key_values
        cache.batch_select_indices(torch.tensor([best], device=_cache_device(cache)))
        if token in stop:
            return
        context = torch.cat([context, cand_hidden[best : best + 1].to(context.dtype)])
        logits = out.logits[best]
        generated.append(token)
        yield token


def _device_of(step: LMStep) -> torch.device:
    return step.logits.device


def _cache_device(cache: Any) -> torch.device | None:
    layers = getattr(cache, "layers", None)
    if layers and getattr(layers[0], "keys", None) is not None:
        return layers[0].keys.device
    return None


def hf_step(lm: nn.Module) -> StepFn:
    """A plain transformers causal LM as a ``StepFn``: last-layer hidden states from its base model."""
    base, head = lm.base_model, lm.get_output_embeddings()
    cache_name = cache_argument(base)

    def step(input_ids: torch.Tensor, cache: Any) -> LMStep:
        past = cache.get_seq_length() if cache is not None else 0
        # An explicit mask: a generated id may equal the pad id, which must not make the LM mask it out.
        mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        out = base(input_ids=input_ids, attention_mask=mask, use_cache=True, **{cache_name: cache})
        hidden = out.last_hidden_state  # (B, T, d)
        return LMStep(logits=head(hidden[:, -1]).float(), hidden=hidden, past_key_values=getattr(out, cache_name))

    return step


def grounded_step(model: nn.Module) -> StepFn:
    """A FROMAGe/GILL ``GroundedLM`` as a ``StepFn`` (its own rows for the image tokens)."""

    def step(input_ids: torch.Tensor, cache: Any) -> LMStep:
        out = model.forward_lm(model.embed_tokens(input_ids), past_key_values=cache, use_cache=True, logits="last")
        return LMStep(logits=out.logits[:, -1], hidden=out.hidden, past_key_values=out.past_key_values)

    return step


# ------------------------------------------------------------------------------------------ CLIP guidance


class ClipGuide(nn.Module):
    """A frozen full CLIP: images embedded once, then any number of text batches scored against them."""

    def __init__(self, model: nn.Module, tokenizer: Any, processor: ImageProcessor):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_length = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))

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
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
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


def tiny_clip_tokenizer(vocab_size: int, model_max_length: int = 77):
    """The offline tokenizer of a random CLIP: the shipped BPE, ending every text with </s> (CLIP pools at EOS)."""
    from tokenizers.processors import TemplateProcessing

    tok = train_tiny_tokenizer(vocab_size, model_max_length=model_max_length)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {tok.eos_token}", special_tokens=[(tok.eos_token, tok.eos_token_id)])
    return tok


def load_clip(spec: ClipSpec, *, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> ClipGuide:
    """A full CLIP (transformers ``CLIPModel``) from the Hub, a directory, or random weights built from config."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    if spec.source == RANDOM:
        cfg = dict(spec.config)
        torch.manual_seed(seed + 1)
        model = CLIPModel(CLIPConfig(**cfg))
        tokenizer = tiny_clip_tokenizer(int(cfg["text_config"].get("vocab_size", 512)),
                                        int(cfg["text_config"].get("max_position_embeddings", 77)))
    else:
        model = from_hub_or_path("CLIP model", spec.source,
                                 lambda s: CLIPModel.from_pretrained(s, revision=spec.revision, dtype=dtype))
        tokenizer = from_hub_or_path("CLIP tokenizer", spec.source,
                                     lambda s: AutoTokenizer.from_pretrained(s, revision=spec.revision))
    size = model.config.vision_config.image_size
    model = model.to(device=device, dtype=dtype)
    return ClipGuide(model, tokenizer, ImageProcessor(size=size, mean=CLIP_MEAN, std=CLIP_STD))


# ------------------------------------------------------------------------------------------ plain LM + CLIP


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

    def stream(self, images: Sequence[Image.Image | str] = (), prompt: str = "", *, decoding: str = "magic",
               k: int | None = None, alpha: float | None = None, beta: float | None = None,
               max_new_tokens: int | None = None) -> Iterator[int]:
        """Yield token ids as they are chosen. ``prompt`` fills the preset's prompt template."""
        settings = resolve_decoding(decoding, self.config.decoding, k=k, alpha=alpha, beta=beta,
                                    max_new_tokens=max_new_tokens)
        if settings.beta > 0 and not images:
            raise ValueError(f"decoding={decoding!r} needs an image (beta={settings.beta} steers the text towards "
                             f"it): pass at least one, or use --decoding contrastive / greedy for text only")
        clip_logits = self.clip.logits_fn([load_image(i) for i in images]) if settings.beta > 0 else None
        prompt_ids = self.prompt_ids(prompt)
        limit = getattr(self.lm.config, "max_position_embeddings", None)
        if limit is not None and prompt_ids.shape[1] + settings.max_new_tokens > limit:
            raise ValueError(f"the prompt ({prompt_ids.shape[1]} tokens) plus max_new_tokens "
                             f"({settings.max_new_tokens}) exceeds the LM's {limit} positions; shorten either")
        step = hf_step(self.lm)
        with torch.no_grad():
            start = step(prompt_ids, None)
        return magic_search(step, start, settings, decode=self.tokenizer.decode, clip_logits=clip_logits,
                            stop_ids=self.stop_ids)

    def generate(self, images: Sequence[Image.Image | str] = (), prompt: str = "", *, decoding: str = "magic",
                 k: int | None = None, alpha: float | None = None, beta: float | None = None,
                 max_new_tokens: int | None = None) -> MagicResult:
        settings = resolve_decoding(decoding, self.config.decoding, k=k, alpha=alpha, beta=beta,
                                    max_new_tokens=max_new_tokens)
        ids = list(self.stream(images, prompt, decoding=decoding, k=k, alpha=alpha, beta=beta,
                               max_new_tokens=max_new_tokens))
        text = " ".join(self.tokenizer.decode(ids, skip_special_tokens=True).split())
        return MagicResult(text=text, token_ids=ids, prompt=self.config.prompt(prompt), settings=settings)

    def prompt_ids(self, prompt: str = "") -> torch.Tensor:
        """(1, T) ids of the filled prompt template. An empty prompt starts from the BOS token."""
        text = self.config.prompt(prompt)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if not ids:
            if self.tokenizer.bos_token_id is None:
                raise ValueError(f"{self.config.name}: the prompt is empty and the tokenizer has no BOS token; "
                                 f"pass a prompt")
            ids = [self.tokenizer.bos_token_id]
        return torch.tensor([ids], device=self.lm.get_input_embeddings().weight.device)

    @property
    def stop_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []


def load_magic(name_or_path: str | MagicConfig = "magic-mscoco", *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, lm: str | None = None,
               clip: str | None = None) -> MagicModel:
    """A MAGIC preset / config file (kind "magic"), or a ``MagicConfig``. ``lm`` / ``clip``: override a component's
    source with a local directory or another Hub id. The published LMs and CLIP come from the Hub (cached)."""
    cfg = name_or_path if isinstance(name_or_path, MagicConfig) else load_config(name_or_path)
    if not isinstance(cfg, MagicConfig):
        raise ValueError(f"{name_or_path!r} is a {cfg.kind!r} model, not a MAGIC preset; use load_pipeline for it, "
                         f"or one of the magic presets (fromage-gill presets)")
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


# ------------------------------------------------------------------------------------------ FROMAGe / GILL

def attach_clip(pipeline: Any, source: str | ClipSpec | ClipGuide | None = None) -> ClipGuide:
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


def attached_clip(pipeline: Any) -> ClipGuide:
    """The full CLIP attached to a pipeline, or a clear error saying how to attach one."""
    guide = pipeline.clip
    if guide is None:
        raise ValueError(_no_text_tower(pipeline))
    return guide


def _no_text_tower(pipeline: Any) -> str:
    src = pipeline.config.vision.source
    hint = "openai/clip-vit-large-patch14" if src == RANDOM else src
    return (f"a model with no CLIP text tower cannot use magic decoding; {pipeline.config.name!r} has only CLIP's "
            f"vision encoder ({src}). Pass a full CLIP: fromage_gill.magic.attach_clip(pipeline, {hint!r}) "
            f"(a Hub id or directory of a transformers CLIPModel, or 'tiny-magic' offline; in the app: --clip SOURCE), "
            f"or use decoding='contrastive', which needs no CLIP")

