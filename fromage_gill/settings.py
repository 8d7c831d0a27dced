"""``GenerationSettings``: how one turn is decoded, validated on construction (a bad value raises ``ValueError``
naming the field and the fix). Ground floor: the model config checks its preset's defaults against it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from .typed_json import JSONValue

MODES = ("auto", "retrieve", "generate", "text")
MAX_SEED = 2**63 - 1
# The decoding strategies (generate/decoding.py implements each): known statically, never by import side effects.
DECODINGS = ("default", "magic", "contrastive")


class WithGenerationDefaults(Protocol):
    """A model config's defaults for these settings (``ModelConfig``, which imports this module: named, not
    imported); values are a preset JSON's, arbitrary until the settings check them."""

    @property
    def generation(self) -> Mapping[str, JSONValue] | None: ...


@dataclass(frozen=True)
class GenerationSettings:
    """How one turn is decoded. Validated on construction: a bad value raises ``ValueError`` naming the field."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy (top_p / top_k then have no effect)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = a fresh seed per turn (reported in TurnEnd.seed)
    mode: Literal["auto", "retrieve", "generate", "text"] = "auto"
    ret_scale_factor: float = 1.0  # published scaling of the [RET]/[IMG0] logit (see sampling.py for its quirk)
    gen_scale_factor: float = 1.0
    image_logit_bias: float = 0.0  # well-behaved alternative: added to the image token's logit
    min_word_tokens: int = 0  # no image before this many tokens of the turn
    max_images: int = 2  # per turn; afterwards image tokens are suppressed
    text_after_images: bool = True  # False: the answer ends with its image (no text is generated after it)
    # Which [RET]/[IMG] hidden states pick the image: "dialogue" (as published) the ones computed in the whole
    # conversation; "answer" the same tokens after the answer's own words alone (BOS + text since the last image),
    # the layout the layers were trained on (captions): for small LMs whose states drift in a long context.
    # The decision head always reads the dialogue's state (it is trained on whole exchanges).
    image_query: Literal["dialogue", "answer"] = "dialogue"
    retrieval_candidates: int = 3  # top-k candidates; the first that loads is shown
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    decoding: str = "default"
    stop_at_eos: bool = True
    stop_strings: tuple[str, ...] | None = None  # None = the model's dialogue stop strings
    # passed to the decoding strategy (generate/decoding.py says which options each takes); values are arbitrary JSON
    decoding_options: Mapping[str, JSONValue] | None = None
    # How the answer is cut (docs/fidelity.md): "full" (the project's) keeps every word up to a stop; "published"
    # as the authors' code: decoding ends at the first newline, each text run is cut after its first full stop
    # (utils.truncate_caption), the text after the answer's last image is dropped, and text is shown a run at a time
    answer_style: Literal["full", "published"] = "full"
    # How earlier answers are fed back on later turns: "exact" (the project's) the very tokens generated, so the
    # KV cache is reused; "published" as the demos: each answer re-tokenized on its own from its truncated text,
    # " [RET]" / " [IMG0]...[IMG7]" after the text before each image, the text after the last image dropped
    history_layout: Literal["exact", "published"] = "exact"

    @classmethod
    def for_model(cls, config: WithGenerationDefaults, **overrides: JSONValue) -> GenerationSettings:
        """The model's defaults (``ModelConfig.generation``) with ``overrides`` on top."""
        return cls(**{**(config.generation or {}), **overrides})

    def __post_init__(self) -> None:
        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"GenerationSettings.{name}={getattr(self, name)!r}: {fix}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        if not is_num(self.temperature) or not 0 <= self.temperature < math.inf:
            raise bad("temperature", "must be a number >= 0 (0 = greedy decoding)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]; use 1.0 to turn nucleus sampling off")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 = off)")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise bad("seed", f"must be None or an integer in [0, {MAX_SEED}]")
        if self.mode not in MODES:
            raise bad("mode", f"must be one of {', '.join(MODES)}")
        for name in ("ret_scale_factor", "gen_scale_factor"):
            v = getattr(self, name)
            if not is_num(v) or not 0 <= v < math.inf:
                raise bad(name, "must be a finite number >= 0 (1.0 = unchanged)")
        if not is_num(self.image_logit_bias):
            raise bad("image_logit_bias", "must be a number (0 = unchanged; +inf forces, -inf forbids images)")
        for name in ("min_word_tokens", "max_images"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be an integer >= 0")
        for name in ("text_after_images", "stop_at_eos"):  # a truthy "no" is not a yes
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if self.image_query not in ("dialogue", "answer"):
            raise bad("image_query", "must be 'dialogue' (as published) or 'answer'")
        if not is_int(self.retrieval_candidates) or self.retrieval_candidates < 1:
            raise bad("retrieval_candidates", "must be an integer >= 1")
        if not is_num(self.guidance_scale) or not 0 <= self.guidance_scale < math.inf:
            raise bad("guidance_scale", "must be a finite number >= 0 (<= 1 turns classifier-free guidance off)")
        if not is_int(self.num_inference_steps) or self.num_inference_steps < 1:
            raise bad("num_inference_steps", "must be an integer >= 1")
        if self.decoding not in DECODINGS:
            raise bad("decoding", f"must be one of {', '.join(DECODINGS)}")
        if self.stop_strings is not None:
            stops = _nonempty_strings(self.stop_strings)
            if stops is None:
                raise bad("stop_strings", "must be None or a tuple of non-empty strings")
            object.__setattr__(self, "stop_strings", stops)
        if self.answer_style not in ("full", "published"):
            raise bad("answer_style", "must be 'full' (every word up to a stop) or 'published' (the authors' cut)")
        if self.history_layout not in ("exact", "published"):
            raise bad("history_layout", "must be 'exact' (the tokens generated) or 'published' (re-tokenized text)")
        if self.decoding_options is not None and not _is_options(self.decoding_options):
            raise bad("decoding_options", "must be None or a mapping of option names to values, e.g. {'k': 5}")


# The checks take ``object``: a preset's JSON, the app or a caller may hand a field anything, whatever its annotation.


def _nonempty_strings(value: object) -> tuple[str, ...] | None:
    """``value`` as a tuple of non-empty strings, or None when it is not one (a lone str is not)."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        return None
    items = tuple(value)
    return items if all(isinstance(s, str) and s for s in items) else None


def _is_options(value: object) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
