"""MAGIC's rule ("Language Models Can See", Su et al. 2022) and contrastive search, as our own KV-cached loop.

At each step, over the LM's top-k next tokens V, choose

    argmax_v  (1 - alpha) * p(v | x)  -  alpha * max_j cos(h_v, h_j)  +  beta * f(v)

``h_v``: the last-layer hidden state of the sequence continued by ``v``; ``h_j``: those of every earlier position,
prompt included (the degeneration penalty of contrastive search); ``f = softmax over V`` of CLIP's image-text logits
(logit_scale x cosine) for the continuation text + ``v``: the generated text without the prompt, its last 60 LM tokens
at most. ``beta = 0`` is contrastive search (SimCTG); ``alpha = beta = 0`` is greedy decoding.

Per step: ONE LM forward over the k candidates (the prefix KV cache expanded k ways; the chosen row is kept, so the
chosen token needs no forward of its own) and ONE CLIP text forward over the k candidate texts (``clip.py``). The
LM is reached through a ``StepFn``: a plain transformers LM (``hf_step``) or a FROMAGe/GILL ``GroundedLM``
(``grounded_step``). The generation engine's "magic" / "contrastive" strategies reuse the rule's pieces
(``fromage_gill/generate/decoding.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..backbones import cache_argument
from ..config import ConfigError, MagicDecoding

if TYPE_CHECKING:  # types only: transformers is imported by the loaders, not by the search rule
    from transformers import PreTrainedModel
    from transformers.cache_utils import Cache

    from ..model import GroundedLM

# What a plain LM + CLIP can decode with (``resolve_decoding``); the engine's own list is ``settings.DECODINGS``.
DECODING_MODES: tuple[str, ...] = ("magic", "contrastive", "greedy")


# ------------------------------------------------------------------------------------------ the rule


def degeneration_penalty(candidate_hidden: torch.Tensor, context_hidden: torch.Tensor) -> torch.Tensor:
    """(k, d) candidates x (T, d) earlier positions -> (k,) max cosine similarity to any earlier position."""
    cand = F.normalize(candidate_hidden.float(), dim=-1)
    ctx = F.normalize(context_hidden.float().to(cand.device), dim=-1)
    return (cand @ ctx.T).max(dim=-1).values


def magic_scores(
    probs: torch.Tensor, penalty: torch.Tensor, clip_logits: torch.Tensor | None, alpha: float, beta: float
) -> torch.Tensor:
    """(k,) LM probabilities, (k,) degeneration penalties, (k,) CLIP logits or None -> (k,) scores."""
    scores = (1.0 - alpha) * probs.float() - alpha * penalty.float()
    if beta and clip_logits is not None:
        scores = scores + beta * clip_logits.float().to(scores.device).softmax(-1)
    return scores


def top_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., V) logits -> the k likeliest tokens of each row, likeliest first (ties go to the lower id, as
    published): their logits, ids and probabilities p(v | x), each (..., k)."""
    logits = logits.float()
    top_logits, top_ids = logits.topk(k, dim=-1)
    probs = (top_logits - logits.logsumexp(-1, keepdim=True)).exp()
    return top_logits, top_ids, probs


def magic_choice(
    top_logits: torch.Tensor,
    probs: torch.Tensor,
    penalty: torch.Tensor,
    clip_logits: torch.Tensor | None,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, int]:
    """MAGIC's rule over one row's k candidates (``top_candidates``): their (k,) scores and the index of the best;
    a forbidden candidate (logit -inf) is never chosen. The one place the rule picks a token, for the plain LM's
    search (``magic_search``) and the chat engine's strategies (``generate/decoding.py``) alike."""
    scores = magic_scores(probs, penalty.to(probs.device), clip_logits, alpha, beta)
    allowed = torch.isfinite(top_logits.to(scores.device))
    return scores, int(scores.masked_fill(~allowed, -torch.inf).argmax())


def continuation_ids(generated: Sequence[int], candidate: int, max_tokens: int) -> list[int]:
    """What CLIP reads for a candidate: the continuation (never the prompt) plus the candidate, last tokens only."""
    return [*generated, int(candidate)][-max_tokens:]


def resolve_decoding(decoding: str, base: MagicDecoding, **overrides: float | None) -> MagicDecoding:
    """The settings one decoding mode uses: "magic" (as given), "contrastive" (beta = 0) or "greedy" (k = 1,
    alpha = beta = 0). ``overrides`` (k, alpha, beta, max_new_tokens; None = keep) are validated as a whole."""
    if decoding not in DECODING_MODES:
        raise ValueError(f"decoding must be one of {', '.join(DECODING_MODES)}, got {decoding!r}")
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
    past_key_values: Cache


@dataclass(frozen=True)
class MagicStep:
    """One step's choice: the k candidates (likeliest first), each one's terms of the rule, and the token chosen."""

    token: int
    candidates: list[int]
    probs: list[float]  # p(v | x)
    penalties: list[float]  # max cosine similarity to any earlier position (0 when alpha = 0)
    clip: list[float] | None  # softmax over the candidates of CLIP's logits; None when beta = 0
    scores: list[float]  # (1 - alpha) p - alpha penalty + beta clip


StepFn = Callable[[torch.Tensor, "Cache | None"], LMStep]  # (B, 1) token ids, cache -> LMStep
ClipLogitsFn = Callable[[list[str]], torch.Tensor]  # k texts -> (k,) image-text logits


def magic_search(
    step: StepFn,
    start: LMStep,
    settings: MagicDecoding,
    *,
    decode: Callable[[list[int]], str],
    clip_logits: ClipLogitsFn | None = None,
    stop_ids: Sequence[int] = (),
    vocab_limit: int | None = None,
    trace: list[MagicStep] | None = None,
) -> Iterator[int]:
    """Yield the chosen token ids one by one (a stop token ends the loop and is not yielded).

    step: runs the LM on (B, 1) token ids with a cache (see ``hf_step`` / ``grounded_step``).
    start: the prompt's forward (batch 1, ``use_cache=True``); its cache is consumed.
    decode: LM token ids -> text, for CLIP. clip_logits: required when ``settings.beta > 0``.
    vocab_limit: candidates are drawn from the first ``vocab_limit`` ids only (e.g. text tokens, not [IMG]).
    trace: a list that gets one ``MagicStep`` per step (the step that chose a stop token included).
    """
    if settings.beta > 0 and clip_logits is None:
        raise ValueError(
            "magic decoding (beta > 0) needs an image to steer towards; pass images, or use "
            "decoding='contrastive' (beta = 0) for text only"
        )
    if start.logits.shape[0] != 1:
        raise ValueError(f"magic decoding runs one sequence at a time, got a batch of {start.logits.shape[0]}")
    return _search(step, start, settings, decode, clip_logits, {int(t) for t in stop_ids}, vocab_limit, trace)


@torch.no_grad()
def _search(
    step: StepFn,
    start: LMStep,
    settings: MagicDecoding,
    decode: Callable[[list[int]], str],
    clip_logits: ClipLogitsFn | None,
    stop: set[int],
    vocab_limit: int | None,
    trace: list[MagicStep] | None = None,
) -> Iterator[int]:
    context = start.hidden[0]  # (T, d): every position a candidate is compared with
    logits = start.logits[0]  # (V,)
    cache = start.past_key_values
    generated: list[int] = []
    for _ in range(settings.max_new_tokens):
        if vocab_limit is not None:
            logits = logits[:vocab_limit]
        k = min(settings.k, logits.shape[-1])
        top_logits, top_ids, probs = top_candidates(logits, k)  # (k,) each

        cache.batch_repeat_interleave(k)  # (1, ...) -> (k, ...): every candidate continues the same prefix
        out = step(top_ids.view(k, 1).to(_device_of(start)), cache)
        cand_hidden = out.hidden[:, -1]  # (k, d)
        penalty = degeneration_penalty(cand_hidden, context) if settings.alpha > 0 else torch.zeros_like(probs)
        guide = None
        if settings.beta > 0 and clip_logits is not None:  # magic_search refused beta > 0 without it
            texts = [decode(continuation_ids(generated, v, settings.clip_text_max_tokens)) for v in top_ids.tolist()]
            assert clip_logits is not None, "magic_search refuses beta > 0 without CLIP"
            guide = clip_logits(texts)
        scores, best = magic_choice(top_logits, probs, penalty, guide, settings.alpha, settings.beta)

        token = int(top_ids[best])
        if trace is not None:
            f = guide.float().softmax(-1).tolist() if guide is not None else None
            trace.append(MagicStep(token, top_ids.tolist(), probs.tolist(), penalty.tolist(), f, scores.tolist()))
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


def _cache_device(cache: Cache) -> torch.device | None:
    layers = getattr(cache, "layers", None)
    if layers and getattr(layers[0], "keys", None) is not None:
        return layers[0].keys.device
    return None


def hf_step(lm: PreTrainedModel) -> StepFn:
    """A plain transformers causal LM as a ``StepFn``: last-layer hidden states from its base model."""
    base, head = lm.base_model, lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings (LM head); MAGIC needs a causal LM")
    cache_name = cache_argument(base)

    def step(input_ids: torch.Tensor, cache: Cache | None) -> LMStep:
        past = cache.get_seq_length() if cache is not None else 0
        # An explicit mask: a generated id may equal the pad id, which must not make the LM mask it out.
        mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        out = base(input_ids=input_ids, attention_mask=mask, use_cache=True, **{cache_name: cache})
        hidden = out.last_hidden_state  # (B, T, d)
        return LMStep(logits=head(hidden[:, -1]).float(), hidden=hidden, past_key_values=getattr(out, cache_name))

    return step


def grounded_step(model: GroundedLM) -> StepFn:
    """A FROMAGe/GILL ``GroundedLM`` as a ``StepFn`` (its own rows for the image tokens)."""

    def step(input_ids: torch.Tensor, cache: Cache | None) -> LMStep:
        from transformers.cache_utils import Cache  # loaded already: the model's LM is a transformers one

        out = model.forward_lm(model.embed_tokens(input_ids), past_key_values=cache, use_cache=True, logits="last")
        if out.logits is None or not isinstance(out.past_key_values, Cache):
            raise RuntimeError("GroundedLM.forward_lm(use_cache=True, logits='last') returned no logits or no cache")
        return LMStep(logits=out.logits[:, -1], hidden=out.hidden, past_key_values=out.past_key_values)

    return step
