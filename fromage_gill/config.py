"""Model variants as data: one JSON preset per variant, loaded into frozen, validated dataclasses.

A preset names each frozen component (language model, vision encoder, diffusion pipeline) by hub id
or local path, or asks for a randomly initialised one built from an inline transformers/diffusers
config (``"source": "random"``) so that tests and the offline demo never touch the network.
Nothing here downloads or builds anything: see ``backbones.py`` and ``pipeline.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .settings import GenerationSettings
from .typed_json import ConfigError, JSONValue, build, check_inline_config, is_int, is_number, require_int, to_jsonable

if TYPE_CHECKING:
    from importlib.abc import Traversable

RANDOM = "random"  # component source meaning "build from the inline config with seeded random weights"


@dataclass(frozen=True)
class LMSpec:
    """The frozen causal language model and its tokenizer."""

    source: str  # hub id, local directory, or "random"
    # transformers config kwargs incl. model_type, for source="random"
    config: Mapping[str, JSONValue] | None = None
    tokenizer: str | None = None  # hub id or directory; defaults to `source`. For "random": a BPE trained offline
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.source != RANDOM:
            return
        config = self.config
        if not (config and "model_type" in config):
            raise ConfigError("lm.config must be a transformers config with a 'model_type' when lm.source is 'random'")
        from transformers import CONFIG_MAPPING, AutoConfig

        model_type = config["model_type"]
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise ConfigError(
                f"lm.config.model_type {model_type!r} is not a transformers model type (e.g. 'gpt2', 'opt', 'llama')"
            )
        # the special-token ids come from the tokenizer when the LM is built (the checks would warn about the
        # model type's defaults, e.g. GPT-2's 50256, being outside a tiny vocabulary)
        options = {**dict.fromkeys(("pad_token_id", "bos_token_id", "eos_token_id")), **config}
        del options["model_type"]
        check_inline_config(
            f"lm.config (a transformers {model_type!r} config)", lambda: AutoConfig.for_model(model_type, **options)
        )


@dataclass(frozen=True)
class VisionSpec:
    """The frozen vision encoder. ``hf_clip``: transformers CLIPVisionModel, pooler output (as published).
    ``open_clip``: an open_clip model's image embedding (``source`` is the architecture name)."""

    backend: Literal["hf_clip", "open_clip"]
    source: str  # hub id / directory (hf_clip), architecture name (open_clip), or "random"
    pretrained: str | None = None  # open_clip pretrained tag or checkpoint file
    # CLIPVisionConfig kwargs (hf_clip) or open_clip vision_cfg, for source="random"
    config: Mapping[str, JSONValue] | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.source != RANDOM:
            return
        config = self.config
        if not config:
            raise ConfigError("vision.config is required when vision.source is 'random'")
        if self.backend == "hf_clip":
            from transformers import CLIPVisionConfig

            check_inline_config("vision.config (a transformers CLIPVisionConfig)", lambda: CLIPVisionConfig(**config))
        else:  # open_clip.CLIP(embed_dim, vision_cfg, text_cfg)
            require_int("vision.config.embed_dim", config.get("embed_dim"), 1)
            for part in ("vision_cfg", "text_cfg"):
                if not isinstance(config.get(part), Mapping):
                    raise ConfigError(
                        f"vision.config.{part} must be an object (an open_clip {part}) when "
                        f"vision.backend is 'open_clip' and vision.source is 'random'"
                    )


@dataclass(frozen=True)
class DiffusionSpec:
    """The frozen Stable Diffusion pipeline GILL conditions on (its text-encoder width = mapper.out_dim)."""

    source: str  # hub id, local directory, or "random"
    # {"unet": {...}, "vae": {...}, "text_encoder": {...}}, for source="random"
    config: Mapping[str, JSONValue] | None = None
    revision: str | None = None
    safety_checker: bool = True

    def __post_init__(self) -> None:
        if self.source != RANDOM:
            return
        config = self.config
        if not (config and {"unet", "vae", "text_encoder"} <= set(config)):
            raise ConfigError(
                "diffusion.config needs 'unet', 'vae' and 'text_encoder' when diffusion.source is 'random'"
            )
        for part in ("unet", "vae", "text_encoder"):
            if not isinstance(config[part], Mapping):
                raise ConfigError(f"diffusion.config.{part} must be an object, got {type(config[part]).__name__}")
        from transformers import CLIPTextConfig

        check_inline_config(
            "diffusion.config.text_encoder (a transformers CLIPTextConfig)",
            lambda: CLIPTextConfig(**config["text_encoder"]),
        )


@dataclass(frozen=True)
class MapperSpec:
    """GILLMapper: LM hidden states of the r [IMG] tokens -> (num_queries, out_dim) diffusion conditioning."""

    d_model: int = 512
    num_heads: int = 4
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    dim_feedforward: int = 2048
    num_queries: int = 77
    out_dim: int = 768

    def __post_init__(self) -> None:
        for name in (
            "d_model",
            "num_heads",
            "num_encoder_layers",
            "num_decoder_layers",
            "dim_feedforward",
            "num_queries",
            "out_dim",
        ):
            require_int(f"mapper.{name}", getattr(self, name), 1)
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"mapper.d_model ({self.d_model}) must be divisible by mapper.num_heads ({self.num_heads})"
            )


@dataclass(frozen=True)
class DialogueSpec:
    """How chat turns become LM text. The published demos use ``Q: ...\\nA:``."""

    user_prefix: str = "Q: "
    assistant_prefix: str = "\nA:"
    turn_separator: str = "\n"
    stop_strings: tuple[str, ...] = ("\nQ:",)
    # How an earlier answer's images appear in the history the LM reads on the next turns: the image tokens it
    # emitted ("tokens", the published demos), or nothing ("omit": only the answer's words; for an LM that never
    # saw image tokens inside a conversation, such as the toy world's, which otherwise repeats its last answer)
    answer_images: Literal["tokens", "omit"] = "tokens"
    # Earlier exchanges the prompt keeps: None = all that fit the LM's context (the published demos); 0 = every
    # message is read alone (for an LM pretrained on independent exchanges). The chat still shows and saves them all.
    max_exchanges: int | None = None

    def __post_init__(self) -> None:
        if self.max_exchanges is not None and not is_int(self.max_exchanges):
            raise ConfigError(
                f"dialogue.max_exchanges must be an integer >= 0 or null (all), got "
                f"{type(self.max_exchanges).__name__} {self.max_exchanges!r}"
            )
        if self.max_exchanges is not None and self.max_exchanges < 0:
            raise ConfigError(f"dialogue.max_exchanges must be >= 0 or null (all), got {self.max_exchanges}")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    kind: Literal["fromage", "gill"]
    lm: LMSpec
    vision: VisionSpec
    n_visual_tokens: int
    image_tokens: tuple[str, ...]  # ("[RET]",) for FROMAGe; ("[IMG0]", ..., "[IMG7]") for GILL
    retrieval_dim: int = 256
    diffusion: DiffusionSpec | None = None
    mapper: MapperSpec | None = None
    decision_head: bool = False
    # The head's dropout (published: 0.5, on a 4096-wide state). On a narrow LM it hides the low-variance directions
    # that tell "show" from "draw": the toy GILL (128 wide) reaches 0.82 with 0.5 and 0.98 without.
    decision_dropout: float = 0.5
    weights: str | None = None  # trained layers: hub repo id or directory; None = seeded random init
    weights_format: Literal["native", "published"] = "native"
    seed: int = 0
    dialogue: DialogueSpec = field(default_factory=DialogueSpec)
    # This model's defaults for GenerationSettings fields (e.g. {"image_logit_bias": 4.0}): what its demo should
    # start from, as the published demos set their own ret_scale_factor. Whatever a user sets still wins.
    generation: Mapping[str, JSONValue] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.generation:
            try:
                GenerationSettings(**self.generation)
            except (TypeError, ValueError) as e:
                raise ConfigError(
                    f"generation: {e} (its keys are GenerationSettings fields, e.g. image_logit_bias, max_new_tokens)"
                ) from None
        if self.kind not in ("fromage", "gill"):
            raise ConfigError(f"kind must be 'fromage' or 'gill', got {self.kind!r}")
        for name in ("n_visual_tokens", "retrieval_dim"):
            require_int(name, getattr(self, name), 1)
        if not is_int(self.seed):
            raise ConfigError(f"seed must be an integer, got {type(self.seed).__name__} {self.seed!r}")
        if not self.image_tokens or len(set(self.image_tokens)) != len(self.image_tokens):
            raise ConfigError(
                f"image_tokens must be a non-empty list of distinct strings, got {list(self.image_tokens)}"
            )
        if self.kind == "gill":
            missing = [n for n in ("diffusion", "mapper") if getattr(self, n) is None]
            if missing:
                raise ConfigError(
                    f"a 'gill' config needs {' and '.join(missing)}; add the section(s) or use kind 'fromage'"
                )
        elif self.mapper is not None or self.decision_head:
            raise ConfigError("'mapper' and 'decision_head' are GILL parts; set kind to 'gill' or remove them")
        if not is_number(self.decision_dropout) or not 0.0 <= self.decision_dropout < 1.0:
            raise ConfigError(f"decision_dropout must be in [0, 1), got {self.decision_dropout!r}")

    @property
    def num_image_tokens(self) -> int:
        return len(self.image_tokens)

    @property
    def can_generate(self) -> bool:
        return self.diffusion is not None and self.mapper is not None

    @property
    def is_random(self) -> bool:
        """True when every frozen component is built from config (the offline tiny presets)."""
        parts = [self.lm.source, self.vision.source] + ([self.diffusion.source] if self.diffusion else [])
        return all(p == RANDOM for p in parts)

    def with_random_backbones(self) -> ModelConfig:
        """This model at full size with seeded random frozen weights: each backbone named by a Hub id with a
        shipped architecture (``presets/architectures/``) is built from that architecture instead of downloaded.
        For tests of real shapes and for benchmarks; the trained layers are untouched (set ``weights`` apart).
        Stable Diffusion's safety checker is off: it has no architecture here and nothing to check random images."""

        def random(spec: LMSpec | VisionSpec | DiffusionSpec, part: str) -> LMSpec | VisionSpec | DiffusionSpec:
            if spec.source == RANDOM:
                return spec
            extra = {"safety_checker": False} if isinstance(spec, DiffusionSpec) else {}
            return dataclasses.replace(spec, source=RANDOM, config=architecture(spec.source, part), **extra)

        diffusion = self.diffusion and random(self.diffusion, "diffusion")
        return dataclasses.replace(
            self, lm=random(self.lm, "lm"), vision=random(self.vision, "vision"), diffusion=diffusion
        )

    def to_dict(self) -> dict[str, JSONValue]:
        return to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, JSONValue]) -> ModelConfig:
        return build(cls, data, path="")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# ---------------------------------------------------------------------------------- MAGIC (plain LM + CLIP)


@dataclass(frozen=True)
class ClipSpec:
    """A full CLIP (image and text towers) that scores image-text pairs during MAGIC decoding."""

    source: str  # hub id, local directory, or "random"
    # CLIPConfig kwargs (text_config, vision_config, projection_dim), for source="random"
    config: Mapping[str, JSONValue] | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.source != RANDOM:
            return
        config = self.config
        if not (config and {"text_config", "vision_config"} <= set(config)):
            raise ConfigError("clip.config needs 'text_config' and 'vision_config' when clip.source is 'random'")
        from transformers import CLIPConfig

        check_inline_config("clip.config (a transformers CLIPConfig)", lambda: CLIPConfig(**config))


@dataclass(frozen=True)
class MagicDecoding:
    """MAGIC's knobs: top-``k`` candidates scored ``(1 - alpha) p - alpha * degeneration + beta * CLIP``.
    ``beta = 0`` is contrastive search; ``alpha = beta = 0`` is greedy decoding."""

    k: int = 45
    alpha: float = 0.1
    beta: float = 2.0
    max_new_tokens: int = 16
    clip_text_max_tokens: int = 60  # CLIP reads the last this-many LM tokens of the continuation (as published)
    # Prompt + continuation tokens at most, as the reference's ``decoding_len`` counts them (its story and caption
    # scripts generate decoding_len - prompt length tokens); None: max_new_tokens alone. Both apply when set.
    max_length: int | None = None

    def __post_init__(self) -> None:
        if not is_int(self.k) or self.k < 1:
            raise ConfigError(f"k (the number of candidates) must be an integer >= 1, got {self.k!r}")
        if not is_number(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha (the degeneration penalty weight) must be in [0, 1], got {self.alpha!r}")
        if not is_number(self.beta) or not 0.0 <= self.beta < math.inf:
            raise ConfigError(
                f"beta (the image guidance weight) must be >= 0 and finite (0: contrastive search), got {self.beta!r}"
            )
        for name in ("max_new_tokens", "clip_text_max_tokens"):
            require_int(name, getattr(self, name), 1)
        if self.max_length is not None:
            require_int("max_length", self.max_length, 1)


@dataclass(frozen=True)
class MagicConfig:
    """MAGIC (Su et al. 2022): an unmodified LM plus a full CLIP, no trained layers. See ``fromage_gill/magic/``."""

    name: str
    kind: Literal["magic"]
    lm: LMSpec
    clip: ClipSpec
    decoding: MagicDecoding = field(default_factory=MagicDecoding)
    # The LM text before the continuation; "{prompt}" is replaced by the user's prompt (a story title, a caption
    # start). The published caption LMs were trained on "<-start_of_text->caption<|endoftext|>".
    prompt_template: str = "{prompt}"
    # Stories (the reference's parse_generated_result): keep the continuation's first n sentences, split at full
    # stops; with n or fewer the final full stop is dropped, as the reference's code does. None: the whole text.
    story_sentences: int | None = None
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if self.story_sentences is not None:
            require_int("story_sentences", self.story_sentences, 1)
        if self.kind != "magic":
            raise ConfigError(f"kind must be 'magic' for a MagicConfig, got {self.kind!r}")
        if self.prompt_template.count("{prompt}") > 1:
            raise ConfigError("prompt_template may contain '{prompt}' at most once")

    @property
    def is_random(self) -> bool:
        return self.lm.source == RANDOM and self.clip.source == RANDOM

    def prompt(self, text: str = "") -> str:
        return self.prompt_template.replace("{prompt}", text)

    def reduced(self) -> MagicConfig:
        """This preset's decoding settings and prompt on the offline ``tiny-magic`` backbones (for tests)."""
        tiny = load_config("tiny-magic")
        assert isinstance(tiny, MagicConfig), "the shipped tiny-magic preset is a MAGIC config"
        # The tiny BPE spells a start token such as "<-start_of_text->" in many pieces: a length that counts the
        # prompt (max_length) means nothing there, so max_new_tokens alone bounds the continuation
        decoding = dataclasses.replace(self.decoding, max_length=None)
        return dataclasses.replace(self, lm=tiny.lm, clip=tiny.clip, decoding=decoding)

    def to_dict(self) -> dict[str, JSONValue]:
        return to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, JSONValue]) -> MagicConfig:
        return build(cls, data, path="")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- presets


def _preset_dir() -> Traversable:
    return resources.files("fromage_gill") / "presets"


def list_presets() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in _preset_dir().iterdir() if p.name.endswith(".json"))


def load_config(name_or_path: str | Path) -> ModelConfig | MagicConfig:
    """A preset name (``list_presets()``), a config JSON file, or a directory holding ``config.json``.
    Kind "magic" gives a ``MagicConfig`` (a plain LM + CLIP), every other kind a ``ModelConfig``."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.is_file():
        return _read_config(path.read_text(), str(path))
    name = str(name_or_path)
    if (_preset_dir() / f"{name}.json").is_file():
        return load_preset(name)
    raise ConfigError(
        f"unknown model {name!r}: not a preset and not a config file or directory. "
        f"Known presets: {', '.join(list_presets())}"
    )


def load_preset(name: str) -> ModelConfig | MagicConfig:
    """The shipped preset ``name`` itself, even where a folder of that name in the working directory would win in
    ``load_config`` (code that means the preset, such as the toy build, reads it here)."""
    preset = _preset_dir() / f"{name}.json"
    if not preset.is_file():
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    return _read_config(preset.read_text(), f"preset {name!r}")


def _architecture_dir() -> Traversable:
    return _preset_dir() / "architectures"


def list_architectures() -> dict[str, str]:
    """The shipped architectures of the published backbones: Hub id -> architecture name (its JSON's stem)."""
    out: dict[str, str] = {}
    for p in sorted(_architecture_dir().iterdir(), key=lambda p: p.name):
        if p.name.endswith(".json"):
            out[json.loads(p.read_text())["describes"]] = p.name[: -len(".json")]
    return out


def architecture(source: str, part: str = "component") -> dict[str, JSONValue]:
    """The config a random ``source`` is built from (transformers / diffusers kwargs), from the architecture file
    that describes Hub id ``source``. ``part`` names the component in the error."""
    known = list_architectures()
    if source not in known:
        raise ConfigError(
            f"{part}.source {source!r} has no shipped architecture, so it cannot be built with random weights "
            f"offline; shipped: {', '.join(sorted(known))}. Set {part}.source to 'random' with an inline "
            f"{part}.config, or add fromage_gill/presets/architectures/NAME.json "
            '({"describes": HUB_ID, "config": {...}})'
        )
    return json.loads((_architecture_dir() / f"{known[source]}.json").read_text())["config"]


def _read_config(text: str, where: str) -> ModelConfig | MagicConfig:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a JSON object, got {type(data).__name__}")
    try:
        return (MagicConfig if data.get("kind") == "magic" else ModelConfig).from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
