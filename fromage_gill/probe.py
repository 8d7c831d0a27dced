"""The research API: what the model computes for given inputs, read through the engine's own code paths.

For a loaded ``Pipeline`` (``load_pipeline``), batched and without gradients, each returning a typed result on the
CPU in float32 (the model runs on ``pipeline.device`` in ``pipeline.dtype``):

- ``embed_images``: images -> the retrieval space (what an image index stores; ``GroundedLM.image_embedding`` of
  the frozen vision features), with the features themselves;
- ``embed_texts``: texts -> the retrieval space, as the chat engine reads a caption (``BOS text [IMG0..r-1]``,
  ``generate.resolve.image_token_states``, then ``GroundedLM.text_embedding`` of the first image token);
- ``embed_prompts``: interleaved prompts (str, images, ``TokenIds``) -> the retrieval space: the image tokens go
  after the prompt, laid out as a chat prompt is (``generate.prompt.encode_pieces`` / ``Prompt.embed``);
- ``generation_embeddings``: the GILLMapper output for a prompt, Stable Diffusion's ``prompt_embeds``
  (num_queries x out_dim; 77 x 768 at full size);
- ``decision_probabilities``: GILL's decision head at the prompt's ``[IMG0]``: (p_generate, p_retrieve);
- ``score_candidates``: the log-likelihood of each candidate continuation of an interleaved context (summed and
  mean over its tokens), e.g. VisDial's 100 answer options.

docs/research.md has examples. Each result equals what the engine itself computes (tests/test_research_api.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image

from .generate.limits import context_length
from .generate.prompt import ImageSegment, Prompt, TokenIds, VisionCache, encode_pieces, normalize_message
from .generate.resolve import image_token_states
from .images import load_image

if TYPE_CHECKING:
    from .pipeline import Pipeline

PromptItem = str | Image.Image | ImageSegment | TokenIds | Path | bytes
PromptLike = str | Sequence[PromptItem]

DEFAULT_BATCH = 16


@dataclass
class ImageEmbeddings:
    embeddings: torch.Tensor  # (N, retrieval_dim) L2-normalised float32: what an image index stores
    features: torch.Tensor  # (N, vision_dim) float32: the frozen vision encoder's output


@dataclass
class TextEmbeddings:
    embeddings: torch.Tensor  # (N, retrieval_dim) L2-normalised float32, at the first image token
    lengths: list[int]  # each prompt's positions, image tokens included

    def scores(self, images: ImageEmbeddings | torch.Tensor) -> torch.Tensor:
        """(N, M) cosine similarities with M image embeddings (the index's ranking; the model's retrieval logits
        are these times ``exp(logit_scale)``, the same order)."""
        other = images.embeddings if isinstance(images, ImageEmbeddings) else images
        return self.embeddings @ other.float().T


@dataclass
class GenerationEmbeddings:
    embeddings: torch.Tensor  # (N, num_queries, out_dim) float32: Stable Diffusion's prompt_embeds


@dataclass
class Decisions:
    probabilities: torch.Tensor  # (N, 2) float32: [p_generate, p_retrieve] (the published head's output order)

    @property
    def retrieve(self) -> torch.Tensor:
        """(N,) bool: the decision head picks retrieval (a tie goes to generation, as published)."""
        return self.probabilities[:, 1] > self.probabilities[:, 0]


@dataclass
class CandidateScores:
    summed: torch.Tensor  # (C,) float32: sum of the candidate tokens' log-probabilities given the context
    mean: torch.Tensor  # (C,) float32: summed / n_tokens
    n_tokens: torch.Tensor  # (C,) int64

    def ranking(self, by: str = "summed") -> torch.Tensor:
        """(C,) candidate indices, best first (``by``: "summed", the papers' choice, or "mean")."""
        if by not in ("summed", "mean"):
            raise ValueError(f"by must be 'summed' or 'mean', got {by!r}")
        return torch.argsort(getattr(self, by), descending=True, stable=True)


# ---------------------------------------------------------------------------------------------- images


ImageLike = Image.Image | str | Path | bytes


@torch.no_grad()
def embed_images(
    pipeline: Pipeline, images: ImageLike | Sequence[ImageLike], *, batch_size: int = DEFAULT_BATCH
) -> ImageEmbeddings:
    """Images (PIL, paths or bytes; each through ``images.load_image``), or one image -> their retrieval embeddings
    (N, or 1 for one image), as an index build computes them (the pipeline's CLIP preprocessing, the frozen encoder,
    ``visual_fc``, L2 norm)."""
    _check_batch_size(batch_size)
    if images is None:
        raise ValueError("images is None: give an image (PIL image, path or bytes) or a list of them")
    if isinstance(images, (Image.Image, str, Path, bytes, bytearray)):
        images = [images]
    if not isinstance(images, Sequence):
        raise ValueError(
            f"images is a {type(images).__name__}; give an image (PIL image, path or bytes) or a list of them"
        )
    if not len(images):
        raise ValueError("images is empty: give at least one image")
    m = pipeline.model
    embs, feats = [], []
    for lo in range(0, len(images), batch_size):
        chunk = [_as_image(img, f"images[{lo + i}]") for i, img in enumerate(images[lo : lo + batch_size])]
        f = m.encode_images(pipeline.image_processor(chunk))  # (B, vision_dim)
        feats.append(f.float().cpu())
        embs.append(m.image_embedding(f).cpu())
    return ImageEmbeddings(embeddings=torch.cat(embs), features=torch.cat(feats))


def _as_image(item, name: str) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str):
        item = Path(item)
    if isinstance(item, (Path, bytes, bytearray)):
        return load_image(bytes(item) if isinstance(item, bytearray) else item, name=str(item)[:200])
    raise ValueError(f"{name} is a {type(item).__name__}; give a PIL image, a path or image bytes")


# ---------------------------------------------------------------------------------------------- prompts


@torch.no_grad()
def embed_texts(pipeline: Pipeline, texts: Sequence[str], *, batch_size: int = DEFAULT_BATCH) -> TextEmbeddings:
    """Texts -> the retrieval space, read as the engine reads a caption: ``BOS text [IMG0..r-1]``
    (``image_token_states``), ``text_embedding`` at the first image token."""
    _check_batch_size(batch_size)
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a list of str (for images among text use embed_prompts)")
    if not texts:
        raise ValueError("texts is empty: give at least one text")
    m, tok = pipeline.model, pipeline.tokenizer
    bos = 0 if tok.bos_token_id is None else 1
    lengths = [bos + len(ids) + len(m.image_token_ids) for ids in tok(list(texts), add_special_tokens=False).input_ids]
    for i, n in enumerate(lengths):
        _check_length(pipeline, n, f"texts[{i}]")
    out = []
    for lo in range(0, len(texts), batch_size):
        out.append(m.text_embedding(image_token_states(pipeline, texts[lo : lo + batch_size])[:, 0]).cpu())
    return TextEmbeddings(embeddings=torch.cat(out), lengths=lengths)


@torch.no_grad()
def embed_prompts(
    pipeline: Pipeline, prompts: Sequence[PromptLike], *, bos: bool = True, batch_size: int = DEFAULT_BATCH
) -> TextEmbeddings:
    """Interleaved prompts -> the retrieval space: the image tokens are put after each prompt and
    ``text_embedding`` reads the first one. A prompt is a str or a list of str, images and ``TokenIds`` (ids used
    verbatim); BOS goes before the first text unless ``bos=False`` (for protocols that place BOS themselves, as
    the published VIST script puts one before every caption)."""
    states, lengths = prompt_states(pipeline, prompts, bos=bos, batch_size=batch_size)
    return TextEmbeddings(embeddings=pipeline.model.text_embedding(states[:, 0]).cpu(), lengths=lengths)


@torch.no_grad()
def generation_embeddings(
    pipeline: Pipeline, prompts: Sequence[PromptLike], *, bos: bool = True, batch_size: int = DEFAULT_BATCH
) -> GenerationEmbeddings:
    """(N, num_queries, out_dim): ``map_to_diffusion`` of the image tokens' states after each prompt, the
    ``prompt_embeds`` GILL gives Stable Diffusion when it generates an image there."""
    states, _ = prompt_states(pipeline, prompts, bos=bos, batch_size=batch_size)
    m = pipeline.model
    out = [m.map_to_diffusion(states[lo : lo + batch_size]).float().cpu() for lo in range(0, len(states), batch_size)]
    return GenerationEmbeddings(embeddings=torch.cat(out))


@torch.no_grad()
def decision_probabilities(
    pipeline: Pipeline, prompts: Sequence[PromptLike], *, bos: bool = True, batch_size: int = DEFAULT_BATCH
) -> Decisions:
    """GILL's decision head at each prompt's ``[IMG0]``: (N, 2) [p_generate, p_retrieve]."""
    if pipeline.model.decision is None:
        raise ValueError(f"{pipeline.config.name} has no decision head (only GILL models with one decide)")
    states, _ = prompt_states(pipeline, prompts, bos=bos, batch_size=batch_size)
    return Decisions(probabilities=pipeline.model.decide(states[:, 0]).cpu())


def prompt_states(
    pipeline: Pipeline, prompts: Sequence[PromptLike], *, bos: bool = True, batch_size: int = DEFAULT_BATCH
) -> tuple[torch.Tensor, list[int]]:
    """(N, r, d) last-layer hidden states at the r image tokens put after each prompt, and each prompt's length
    (image tokens included). Prompts are batched with right padding (every row keeps positions 0..len-1)."""
    _check_batch_size(batch_size)
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of prompts (each a str or a list of str and images)")
    m = pipeline.model
    r = len(m.image_token_ids)
    encoded = [
        _encode(pipeline, p, f"prompts[{i}]", [TokenIds(tuple(m.image_token_ids))], bos) for i, p in enumerate(prompts)
    ]
    for i, p in enumerate(encoded):
        _check_length(pipeline, len(p), f"prompts[{i}]")
    cache = VisionCache(max_items=max(256, batch_size * 8))
    states = []
    for lo in range(0, len(encoded), batch_size):
        chunk = encoded[lo : lo + batch_size]
        hidden = _hidden(pipeline, chunk, cache)  # (B, T, d)
        states += [hidden[i, len(p) - r : len(p)] for i, p in enumerate(chunk)]
    return torch.stack(states), [len(p) for p in encoded]


def _encode(pipeline: Pipeline, prompt: PromptLike, name: str, tail: list, bos: bool) -> Prompt:
    segs = normalize_message(prompt, name=name, allow_token_ids=True)
    return encode_pieces(pipeline.tokenizer, [*segs, *tail], pipeline.config.n_visual_tokens, bos=bos)


def _padded(pipeline: Pipeline, prompts: Sequence[Prompt], cache: VisionCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's embeddings (``Prompt.embed``: the chat engine's layout) right-padded: (B, T, d) and (B, T)."""
    m = pipeline.model
    images = [img for p in prompts for img in p.images()]
    if images:  # the batch's images through the vision encoder in one call; each prompt then reads the cache
        cache.features(m, images)
    rows = [p.embed(m, cache) for p in prompts]
    length = max(len(p) for p in prompts)
    x = torch.zeros(len(rows), length, m.hidden_size, device=m.device, dtype=m.dtype)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=m.device)
    for i, row in enumerate(rows):
        x[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return x, mask


def _hidden(pipeline: Pipeline, prompts: Sequence[Prompt], cache: VisionCache) -> torch.Tensor:
    x, mask = _padded(pipeline, prompts, cache)
    return pipeline.model.forward_lm(x, mask, logits="none").hidden


# ---------------------------------------------------------------------------------------------- candidates


@torch.no_grad()
def score_candidates(
    pipeline: Pipeline,
    context: PromptLike,
    candidates: Sequence[str],
    *,
    bos: bool = True,
    batch_size: int = DEFAULT_BATCH,
) -> CandidateScores:
    """Log-likelihood of each candidate after ``context`` (interleaved str / images / ``TokenIds``, laid out as a
    chat prompt): each candidate is tokenized on its own (no special tokens) and appended to the context's
    positions; ``summed`` adds its tokens' next-token log-probabilities (the papers rank VisDial's options by it)."""
    _check_batch_size(batch_size)
    if isinstance(candidates, str) or not candidates:
        raise ValueError("candidates must be a non-empty list of str")
    m, tok = pipeline.model, pipeline.tokenizer
    ctx = _encode(pipeline, context, "context", [], bos)
    cand_ids = tok(list(candidates), add_special_tokens=False).input_ids
    empty = [i for i, ids in enumerate(cand_ids) if not ids]
    if empty:
        raise ValueError(f"candidates {empty[:5]} tokenize to nothing: every candidate needs at least one token")
    for i, ids in enumerate(cand_ids):
        _check_length(pipeline, len(ctx) + len(ids), f"context + candidates[{i}]")
    cache = VisionCache()
    ctx_embeds = ctx.embed(m, cache)  # (Tc, d), computed once for every candidate
    n = len(ctx)
    summed, counts = [], []
    for lo in range(0, len(cand_ids), batch_size):
        chunk = cand_ids[lo : lo + batch_size]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), 0, dtype=torch.long, device=m.device)
        mask = torch.zeros(len(chunk), n + width, dtype=torch.long, device=m.device)
        for i, c in enumerate(chunk):
            ids[i, : len(c)] = torch.tensor(c)
            mask[i, : n + len(c)] = 1
        x = torch.cat([ctx_embeds[None].expand(len(chunk), -1, -1), m.embed_tokens(ids)], dim=1)  # (B, Tc + W, d)
        hidden = m.forward_lm(x, mask, logits="none").hidden
        logp = F.log_softmax(m.logits(hidden[:, n - 1 : n - 1 + width]), dim=-1)  # (B, W, V): predicts the candidate
        picked = logp.gather(-1, ids.to(logp.device)[..., None])[..., 0]  # (B, W)
        valid = mask[:, n:].to(picked.device).bool()
        summed.append(picked.masked_fill(~valid, 0).sum(-1).cpu())
        counts.append(valid.sum(-1).cpu())
    s, c = torch.cat(summed), torch.cat(counts)
    return CandidateScores(summed=s, mean=s / c, n_tokens=c)


def _check_length(pipeline: Pipeline, n: int, name: str) -> None:
    """Refuse an input longer than the LM's positions before any memory is spent on it. An error, not a silent
    or warned truncation: the result is read after the text (at the image tokens, or the candidate's own tokens), so
    cutting the text changes what is measured; which end to keep is the caller's choice."""
    limit = context_length(pipeline)
    if n > limit:
        raise ValueError(
            f"{name} is {n} tokens (image tokens included) but {pipeline.config.name}'s LM reads at most {limit}; "
            f"shorten it, e.g. keep the first tokens with pipeline.tokenizer(text, truncation=True, "
            f"max_length=...) and decode them"
        )


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
