"""The generation settings as the app's controls show them: one help line per control, their starting values,
and GenerationSettings from their values (a ValueError naming the setting when one is out of range)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from PIL import Image

from ..generate import GenerationSettings
from ..generate.limits import MAX_IMAGES_PER_MESSAGE, context_length, image_paths, image_positions
from ..generate.prompt import Turn, dialogue_pieces, encode_pieces, normalize_message
from ..pipeline import Pipeline
from ..settings import DECODINGS

if TYPE_CHECKING:
    from ..retrieve.index import ImageIndex

# One line per setting, shown under its control in the app: what it does, in plain words.
SETTINGS_HELP: dict[str, str] = {
    "answer_style": "Whole answer, or only its first sentence the way the FROMAGe / GILL authors' demo cut it "
    "(to compare with the papers).",
    "history_layout": "How earlier answers are read back to the model: word for word as generated, or re-read from "
    "their text as the authors' demo does (to compare with the papers).",
    "mode": "auto: the model decides when an answer shows an image, and whether it finds or draws it.",
    "max_new_tokens": "The longest an answer may be, in tokens (a token is about ¾ of a word).",
    "temperature": "0: always the most likely next word, the same answer each time; higher: more varied answers.",
    "top_p": "Choose only among the likeliest words that together make up this share of the chances (1: all).",
    "image_frequency": "How readily answers show images: 1 as the model learned, above 1 more often, below 1 less, "
    "0 never.",
    "image_logit_bias": "Nudges the model towards images: above 0 they come sooner, below 0 later or never.",
    "max_images": "At most this many images in one answer.",
    "retrieval_candidates": "How many of the closest images in the collection are looked at; the best one not "
    "shown yet is used.",
    "guidance_scale": "How closely a drawn image follows its description: higher follows it more literally.",
    "num_inference_steps": "Drawing steps: fewer is faster and rougher.",
    "seed": "A number makes answers and drawings repeatable; 'random' picks a new one each time.",
    "index": "The image collection that found images come from.",
    "decoding": "default: plain sampling.",
}
DECODING_HELP = {
    "default": "default: plain sampling",
    "contrastive": "contrastive: avoids repeating itself",
    "magic": "magic: steers the words towards the images (MAGIC)",
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

# A setting's value as a control or an API call gives it: arbitrary (a browser sends what it likes) until
# GenerationSettings checks it in __post_init__, which names the setting and its range when a value does not fit.
SettingValue: TypeAlias = Any


def default_settings(pipeline: Pipeline, overrides: Mapping[str, SettingValue]) -> dict[str, SettingValue]:
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
ROUND_TOKENS = 16  # the Max new tokens control ends on a round number (480, not 489)
MAX_CANDIDATES = 20  # retrieval candidates offered (fewer when the index holds fewer images)
MAX_DIFFUSION_STEPS = 100  # beyond this Stable Diffusion's DDIM output no longer changes visibly


def max_new_tokens_limit(pipeline: Pipeline, settings: Mapping[str, SettingValue]) -> int:
    """The most new tokens a first message of one image and a few words leaves room for in the LM's context (with
    the image tokens an answer's images may take), rounded down to a multiple of ``ROUND_TOKENS``: the Max new
    tokens control goes no higher, so that no value it offers fails every message with "needs N positions, but the
    LM fits M"."""
    message = normalize_message([Image.new("RGB", (8, 8)), SHORT_MESSAGE])
    pieces = dialogue_pieces([Turn("user", message)], pipeline.config.dialogue, pipeline.model.image_token_ids)
    prompt = encode_pieces(pipeline.tokenizer, pieces, pipeline.config.n_visual_tokens)
    known = {f.name for f in dataclasses.fields(GenerationSettings)}
    extra = image_positions(pipeline, GenerationSettings(**{k: v for k, v in settings.items() if k in known}))
    room = context_length(pipeline) - len(prompt) - extra
    return max(1, room - room % ROUND_TOKENS if room >= 4 * ROUND_TOKENS else room)


def mode_choices(pipeline: Pipeline, has_index: bool) -> list[str]:
    """The image modes that can run: "retrieve" needs an index, "generate" an image generator."""
    probe = GenerationSettings(mode="auto")
    can_generate = image_paths(pipeline, probe)[1]
    return [
        m
        for m in ("auto", "retrieve", "generate", "text")
        if (m != "retrieve" or has_index) and (m != "generate" or can_generate)
    ]


# ---------------------------------------------------------------------------------------------------------------
# The settings panel as data: app.py makes one gradio component per row of this table.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Control:
    """One control of the settings panel: the API parameter it sets (``key``), its label and help line, its kind,
    and a slider's bounds and step or a choice's ``(label, value)`` pairs. Controls of the same ``row`` sit side by
    side."""

    key: str
    label: str
    kind: Literal["slider", "choice", "dropdown", "text"]
    row: int
    help: str = ""
    bounds: tuple[float, float] = (0.0, 1.0)
    step: float = 1.0
    choices: tuple[tuple[str, str], ...] = ()
    visible: bool = True
    elem_id: str = ""

    def __post_init__(self) -> None:
        if not self.elem_id:
            object.__setattr__(self, "elem_id", f"set_{self.key}")


MODE_LABELS = {
    "auto": "auto: the model decides",
    "retrieve": "retrieve: find one in the collection",
    "generate": "generate: draw one",
    "text": "text: no images",
}


def _slider(
    key: str, label: str, row: int, lo: float, hi: float, step: float, help_key: str = "", *, elem_id: str = "",
    visible: bool = True,
) -> Control:  # fmt: skip
    help_line = SETTINGS_HELP[help_key or key]
    return Control(key, label, "slider", row, help_line, (lo, hi), step, visible=visible, elem_id=elem_id)


def _choice(
    key: str, label: str, row: int, pairs: Sequence[tuple[str, str]], *, help: str = "", visible: bool = True
) -> Control:
    return Control(key, label, "choice", row, help or SETTINGS_HELP[key], choices=tuple(pairs), visible=visible)


def settings_table(
    *,
    max_new_tokens: int,
    modes: Sequence[str],
    decodings: Sequence[str],
    index_names: Sequence[str],
    index_size: int | None,
) -> list[Control]:
    """The settings panel: every control with its bounds, from the model (``max_new_tokens``: what fits its
    context, ``modes`` and ``decodings``: what can run on it), the index (its size bounds the retrieval candidates)
    and the limits (``MAX_IMAGES_PER_MESSAGE``: an answer is a message)."""
    h = SETTINGS_HELP
    candidates = max(1, min(MAX_CANDIDATES, index_size or MAX_CANDIDATES))
    names = list(index_names) or [NO_INDEX]
    decoding_help = "; ".join(DECODING_HELP[d] for d in decodings) + "."
    tokens_help = (
        f"{h['max_new_tokens']} Up to {max_new_tokens}: what the model's context leaves after a short message."
    )

    return [
        _choice("mode", "Images in answers", 0, [(MODE_LABELS[m], m) for m in modes]),
        Control("max_new_tokens", "Longest answer (tokens)", "slider", 1, tokens_help, (1, max_new_tokens), 1),
        _slider("temperature", "Variety (temperature)", 1, 0.0, 2.0, 0.05),
        _slider("top_p", "Word choice breadth (top-p)", 1, 0.05, 1.0, 0.05),
        _slider(
            "ret_scale_factor", "How often: found images", 2, 0.0, 5.0, 0.1, "image_frequency", elem_id="set_ret_scale"
        ),
        _slider(
            "gen_scale_factor", "How often: drawn images", 2, 0.0, 5.0, 0.1, "image_frequency", elem_id="set_gen_scale"
        ),
        _slider("image_logit_bias", "Image nudge", 2, -20.0, 20.0, 0.5, elem_id="set_image_bias"),
        _slider("max_images", "Images per answer, at most", 2, 0, MAX_IMAGES_PER_MESSAGE, 1),
        _slider(
            "retrieval_candidates",
            "Images looked at when finding one",
            3,
            1,
            max(candidates, 2),  # a slider needs two ends; with one image in the index it is hidden
            1,
            visible=candidates > 1,
        ),
        _slider("guidance_scale", "Drawing: follow the description", 3, 1.0, 20.0, 0.5),
        _slider("num_inference_steps", "Drawing steps", 3, 1, MAX_DIFFUSION_STEPS, 1, elem_id="set_steps"),
        Control("seed", "Seed", "text", 4, h["seed"]),
        Control(
            "index",
            "Image collection",
            "dropdown",
            4,
            h["index"],
            choices=tuple((n, n) for n in names),
            visible=len(names) > 1,
        ),
        _choice("decoding", "Decoding", 4, [(d, d) for d in decodings], help=decoding_help, visible=len(decodings) > 1),
        _choice(
            "answer_style",
            "Answer length",
            5,
            [("whole answer", "full"), ("first sentence, as in the papers' demo", "published")],
        ),
        _choice(
            "history_layout",
            "Earlier answers read back",
            5,
            [("word for word", "exact"), ("from their text, as in the papers' demo", "published")],
        ),
    ]


def starting_value(control: Control, defaults: Mapping[str, SettingValue]) -> float | str:
    """The value a control starts with: the default setting, clipped into a slider's bounds."""
    if control.key == "seed":
        return "random" if defaults.get("seed") is None else str(defaults["seed"])
    if control.key == "index":
        return control.choices[0][1]
    value = defaults[control.key]  # default_settings holds every setting
    if control.kind == "slider":
        lo, hi = control.bounds
        clipped = float(min(max(float(value), lo), hi))
        return int(clipped) if control.step == 1 and clipped.is_integer() else clipped  # 24 tokens, not 24.0
    values = [v for _, v in control.choices]
    return value if value in values else values[0]


def _whole(key: str, value: SettingValue) -> int:
    """A control's value as a whole number, refusing 2.7 or "abc" with the setting's name (int() would take 2.7 as 2,
    and "abc" would reach the user as gradio's generic error)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a whole number, got {value!r}.") from None
    if not number.is_integer():
        raise ValueError(f"{key} must be a whole number, got {value!r}.")
    return int(number)


def make_settings(base: Mapping[str, SettingValue], ui: Mapping[str, SettingValue]) -> GenerationSettings:
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


def control_values(settings: GenerationSettings) -> dict[str, SettingValue]:
    """The controls' values that show ``settings`` (the inverse of ``make_settings``), keyed like its ``ui``."""
    values = dataclasses.asdict(settings)
    out = {key: values[key] for key in SETTING_KEYS if key in values}
    out["seed"] = "random" if values["seed"] is None else str(values["seed"])
    return out


def kept_values(table: Sequence[Control], kept: object) -> dict[str, float | str]:
    """The settings a browser kept (``{key: value}``) that still fit the table: a slider's value within its bounds,
    a choice among its choices; the others are left out (the control keeps its starting value)."""
    out: dict[str, float | str] = {}
    for c in table:
        value = kept.get(c.key) if isinstance(kept, dict) else None
        if value is None:
            continue
        if c.kind == "slider":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and c.bounds[0] <= value <= c.bounds[1]
        elif c.kind == "text":
            ok = isinstance(value, str) and len(value) < 40
        else:
            ok = value in [v for _, v in c.choices]
        if ok:
            out[c.key] = value
    return out


@dataclass
class SettingsPanel:
    """The settings panel of an app: the controls' starting values, the most new tokens an answer may take, the
    decodings that can run, and the table of controls."""

    defaults: dict[str, SettingValue]
    max_new_tokens: int
    decodings: list[str]
    table: list[Control]


def settings_panel(
    pipeline: Pipeline, overrides: Mapping[str, SettingValue], indexes: Mapping[str, ImageIndex]
) -> SettingsPanel:
    """The panel for ``pipeline`` and its ``indexes`` ({name: ImageIndex}), starting from ``overrides``."""
    defaults = default_settings(pipeline, overrides)
    limit = max_new_tokens_limit(pipeline, defaults)  # the control's range: what can fit
    defaults["max_new_tokens"] = min(defaults["max_new_tokens"], limit)
    decodings = decoding_choices(pipeline)  # only those that can run here
    table = settings_table(
        max_new_tokens=limit,
        modes=mode_choices(pipeline, bool(indexes)),
        decodings=decodings,
        index_names=list(indexes),
        index_size=min((len(i) for i in indexes.values()), default=None),
    )
    return SettingsPanel(defaults, limit, decodings, table)
