"""The generation settings as the app's controls show them: one help line per control, their starting values,
and GenerationSettings from their values (a ValueError naming the setting when one is out of range)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from PIL import Image

from ..generate import GenerationSettings
from ..generate.limits import context_length, image_positions
from ..generate.prompt import Turn, dialogue_pieces, encode_pieces, normalize_message
from ..pipeline import Pipeline
from ..settings import DECODINGS

# One line per setting, shown under its control in the app.
SETTINGS_HELP: dict[str, str] = {
    "answer_style": "full: every word up to a stop; published: the authors' demo cut (first line, first full stop), "
    "to reproduce the papers.",
    "history_layout": "exact: earlier answers fed back as generated; published: re-tokenized from their cut text, "
    "as the authors' demo does.",
    "mode": "auto: the model decides when to show an image and whether to retrieve or generate it; "
    "retrieve / generate: always that source; text: never an image.",
    "max_new_tokens": "Upper bound on the length of each answer (in tokens).",
    "temperature": "0 = always the most likely token (deterministic); higher = more varied.",
    "top_p": "Sample only from the most likely tokens whose probabilities add up to this (1 = all).",
    "image_frequency": "Scales the logits of the image tokens: above 1 shows images more often, below 1 less.",
    "image_logit_bias": "Added to the image token's score: positive shows images sooner, negative later or never.",
    "max_images": "At most this many images in one answer.",
    "retrieval_candidates": "How many nearest images the index returns; the best one not yet shown is used.",
    "guidance_scale": "Classifier-free guidance of Stable Diffusion: higher follows the model's prompt more closely.",
    "num_inference_steps": "Diffusion denoising steps: fewer is faster and rougher.",
    "seed": "Fixes sampling and image generation so a turn can be reproduced; 'random' picks a new seed each turn.",
    "index": "The image collection that retrieved images come from.",
    "decoding": "default: plain sampling; magic / contrastive: MAGIC decoding, steering text towards the images.",
}

NO_INDEX = "none"  # the index control's value when no index is loaded
# The GenerationSettings fields the controls set (besides "seed", a text box, and "index", which is not a setting)
SETTING_KEYS = (
    "mode",
    "max_new_tokens",
    "temperature",
    "top_p",
    "ret_scale_factor",
    "gen_scale_factor",
    "image_logit_bias",
    "max_images",
    "retrieval_candidates",
    "guidance_scale",
    "num_inference_steps",
    "decoding",
    "answer_style",
    "history_layout",
)
_INTEGER_KEYS = ("max_new_tokens", "max_images", "retrieval_candidates", "num_inference_steps")


def default_settings(pipeline: Pipeline, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The controls' starting values: the model's own settings, then ``overrides`` (``AppOptions.defaults``)."""
    values = dataclasses.asdict(GenerationSettings.for_model(pipeline.config))
    if pipeline.config.is_random:  # the tiny offline demo: short answers and few diffusion steps keep it snappy
        values.update(max_new_tokens=24, num_inference_steps=4)
    values.update(overrides)
    if values.get("decoding") not in decoding_choices(pipeline):
        values["decoding"] = "default"
    return values


def decoding_choices(pipeline: Pipeline | None = None) -> list[str]:
    """The decoding strategies that can run on ``pipeline`` (all the engine knows when None): "magic" steers
    towards the images with a full CLIP, so it is offered only when one is attached (``--clip``)."""
    return [d for d in DECODINGS if d != "magic" or pipeline is None or pipeline.clip is not None]


SHORT_MESSAGE = "What is in this image?"  # with one image: the smallest first message that max_new_tokens must fit


def max_new_tokens_limit(pipeline: Pipeline, settings: Mapping[str, Any]) -> int:
    """The most new tokens a first message of one image and a few words leaves room for in the LM's context (with
    the image tokens an answer's images may take): the Max new tokens control goes no higher, so that no value it
    offers fails every message with "needs N positions, but the LM fits M"."""
    message = normalize_message([Image.new("RGB", (8, 8)), SHORT_MESSAGE])
    pieces = dialogue_pieces([Turn("user", message)], pipeline.config.dialogue, pipeline.model.image_token_ids)
    prompt = encode_pieces(pipeline.tokenizer, pieces, pipeline.config.n_visual_tokens)
    known = {f.name for f in dataclasses.fields(GenerationSettings)}
    extra = image_positions(pipeline, GenerationSettings(**{k: v for k, v in settings.items() if k in known}))
    return max(1, context_length(pipeline) - len(prompt) - extra)


def _whole(key: str, value: Any) -> int:
    """A control's value as a whole number, refusing 2.7 or "abc" with the setting's name (int() would take 2.7 as 2,
    and "abc" would reach the user as gradio's generic error)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a whole number, got {value!r}.") from None
    if not number.is_integer():
        raise ValueError(f"{key} must be a whole number, got {value!r}.")
    return int(number)


def make_settings(base: Mapping[str, Any], ui: Mapping[str, Any]) -> GenerationSettings:
    """GenerationSettings from the controls' values over ``base`` (ValueError, naming the setting, when one is out
    of range). The seed is text: a whole number, or "random" / empty for a new one each turn."""
    values = dict(base)
    for key in SETTING_KEYS:
        if ui.get(key) is not None:
            values[key] = ui[key]
    for key in _INTEGER_KEYS:
        if key in values:
            values[key] = _whole(key, values[key])
    seed = ui.get("seed")
    seed = "random" if seed is None else str(seed).strip().lower()
    if seed in ("", "random", "none", "-1"):
        values["seed"] = None
    else:
        try:
            values["seed"] = int(seed)
        except ValueError:
            raise ValueError(f"Seed must be a whole number or 'random', got {seed!r}.") from None
    return GenerationSettings(**values)


def control_values(settings: GenerationSettings) -> dict[str, Any]:
    """The controls' values that show ``settings`` (the inverse of ``make_settings``), keyed like its ``ui``."""
    values = dataclasses.asdict(settings)
    out = {key: values[key] for key in SETTING_KEYS if key in values}
    out["seed"] = "random" if values["seed"] is None else str(values["seed"])
    return out
