"""Decoding as small pure functions: the image-token logit rules, then the choice of the next token.

Everything here maps a ``(B, V)`` float tensor of next-token logits to a new tensor; nothing keeps state, so the
decode loop (``generate.py``), the MAGIC helper and the tests all call the very same code.

Image-token rules (``image_token_logits``), as in the published code:

- ``[IMG1]..[IMG{r-1}]`` are never sampled: when ``[IMG0]`` is chosen the loop appends all r tokens at once.
- Before ``min_word_tokens`` tokens of the turn have been generated, and whenever images are not allowed (mode
  ``text``, or the turn already holds ``max_images`` images), ``[RET]`` / ``[IMG0]`` is removed (-inf).
- ``ret_scale_factor`` / ``gen_scale_factor`` reproduce the published scaling, quirks included:

  * FROMAGe multiplies the raw ``[RET]`` logit by ``ret_scale_factor`` (any value). A logit is not a probability:
    when the ``[RET]`` logit is negative, a factor > 1 makes it *more* negative and retrieval *less* likely, the
    opposite of what the knob promises; a factor of 0 sets the logit to 0, which can make ``[RET]`` likelier.
  * GILL uses ``|logit| * factor`` and only for factors > 1 (``ret_scale_factor`` then ``gen_scale_factor``, both
    on ``[IMG0]``, which is GILL's retrieval and generation token at once). Taking the absolute value turns a
    strongly negative logit into a strongly positive one, so a factor of 1.01 can take ``[IMG0]`` from never to
    always; factors <= 1 do nothing.

  ``image_logit_bias`` is the well-behaved alternative: it is added to the logit, i.e. the odds of the image
  token against every other token are multiplied by ``exp(bias)`` whatever the logit's sign (``+inf`` forces it,
  ``-inf`` forbids it). Leave the factors at 1.0 to use it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

NEG_INF = float("-inf")


def image_token_logits(
    logits: torch.Tensor,
    image_token_ids: Sequence[int],
    *,
    allow_image: torch.Tensor | bool = True,
    style: Literal["fromage", "gill"] = "gill",
    ret_scale_factor: float = 1.0,
    gen_scale_factor: float = 1.0,
    bias: float = 0.0,
) -> torch.Tensor:
    """Apply the image-token rules to ``(B, V)`` logits; returns a new tensor.

    ``allow_image``: a bool or a ``(B,)`` bool tensor, False where ``[RET]``/``[IMG0]`` must not be produced
    (``min_word_tokens`` not reached, mode ``text``, ``max_images`` reached). ``style``: whose scaling to reproduce.
    """
    logits = logits.clone()
    first, rest = image_token_ids[0], list(image_token_ids[1:])
    if rest:
        logits[:, rest] = NEG_INF
    x = logits[:, first]
    if style == "fromage":
        x = x * ret_scale_factor
    elif style == "gill":
        if ret_scale_factor > 1:
            x = x.abs() * ret_scale_factor
        if gen_scale_factor > 1:
            x = x.abs() * gen_scale_factor
    else:
        raise ValueError(f"style must be 'fromage' or 'gill', got {style!r}")
    x = x + bias
    allow = torch.as_tensor(allow_image, dtype=torch.bool, device=logits.device).expand(x.shape)
    logits[:, first] = torch.where(allow, x, torch.full_like(x, NEG_INF))
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept); ``k <= 0`` keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probabilities add up to at least ``p``.
    The most likely token is always kept (as in the published code)."""
    if p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum > p
    remove[:, 1:] = remove[:, :-1].clone()  # shift right: the token that crosses p stays in
    remove[:, 0] = False
    return logits.masked_fill(remove.scatter(-1, sorted_idx, remove), NEG_INF)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(B, V)`` logits -> ``(B,)`` token ids. Greedy when ``temperature == 0`` (top-p and top-k then do not
    matter); otherwise temperature, then top-k, then top-p, then one draw from ``generator``.

    The draw happens on the generator's device (a CPU generator by default), so a seed gives the same tokens
    whatever device the LM runs on, given the same logits.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    device = generator.device if generator is not None else logits.device
    x = logits.float().to(device)
    forced = torch.isposinf(x)
    if forced.any():  # a +inf logit (e.g. image_logit_bias=inf) means "this token": softmax would give NaN
        rows = forced.any(-1, keepdim=True)
        x = torch.where(rows, torch.where(forced, 0.0, NEG_INF), x)
    x = x / temperature
    x = top_p_filter(top_k_filter(x, top_k), top_p)
    probs = x.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
