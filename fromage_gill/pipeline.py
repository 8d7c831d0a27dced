"""``load_pipeline``: the one public entry point that turns a preset, a directory or a Hub repo into a ready model.

Resolution of ``name_or_path``:
1. a directory with ``config.json`` (this project's format, e.g. written by ``save_pretrained``/``convert``);
2. a directory with ``model_args.json`` + ``pretrained_ckpt.pth.tar`` (the published FROMAGe/GILL layout);
3. a preset name (``list_presets()``) or a config JSON file;
4. a Hub repo id holding either layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import checkpoint as ckpt
from .backbones import Quantization, load_diffusion, load_lm, load_tokenizer, load_vision
from .config import RANDOM, ConfigError, MagicConfig, ModelConfig, list_presets, load_config
from .devices import default_device, default_dtype, parse_dtype
from .generate.diffusion import ImageGenerator
from .hub import fetch_file
from .model import GroundedLM
from .paths import checkout_path

if TYPE_CHECKING:  # types only: loading them at import would pull in transformers and diffusers eagerly
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from transformers import PreTrainedTokenizerBase

    from .magic.clip import ClipGuide
    from .retrieve.index import ImageIndex

logger = logging.getLogger(__name__)


@dataclass
class Pipeline:
    """Everything one conversation needs, as typed components (as a diffusers pipeline holds its own):

    - ``model``: the grounded LM (frozen LM + vision encoder + trained layers) and ``tokenizer`` (image tokens added);
    - ``diffusion``: GILL's Stable Diffusion pipeline, and ``image_generator``, which runs it from mapper output
      (made from ``diffusion`` when not given: it holds the pipeline's lock and cached negative embeddings);
    - ``index``: the image index retrieval searches, or None;
    - ``clip``: a full CLIP for MAGIC-guided decoding (``fromage_gill.magic.attach_clip``), or None.
    """

    config: ModelConfig
    model: GroundedLM
    tokenizer: PreTrainedTokenizerBase
    diffusion: StableDiffusionPipeline | None
    device: torch.device
    dtype: torch.dtype
    index: ImageIndex | None = None
    clip: ClipGuide | None = None
    image_generator: ImageGenerator | None = None

    def __post_init__(self) -> None:
        if self.image_generator is None and self.diffusion is not None:
            spec = self.config.diffusion
            self.image_generator = ImageGenerator(self.diffusion, safety_checker=spec.safety_checker if spec else True)

    @property
    def image_processor(self):
        return self.model.vision.processor

    def save_pretrained(self, directory: str | Path) -> Path:
        """This project's format: config.json + model.safetensors with only the trained layers."""
        return ckpt.save_native(self.model, directory, self.config)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message="Upload fromage_gill weights")
        return str(info)

    def __repr__(self) -> str:
        m, c = self.model, self.config
        n_trained = sum(p.numel() for p in m.trained_parameters().values())
        lines = [
            f"Pipeline({c.name!r}, kind={c.kind}, device={self.device},"
            f" dtype={str(self.dtype).removeprefix('torch.')})",
            f"  lm: {c.lm.source} ({type(m.lm).__name__}, hidden {m.hidden_size}, vocab {m.n_base}"
            f" + {len(m.image_token_ids)} image tokens, {'tied' if m.tied else 'untied'} embeddings)",
            f"  vision: {c.vision.backend} {c.vision.source} (features {m.vision.out_dim},"
            f" {m.vision.processor.size}px) -> {c.n_visual_tokens} visual token(s)",
            f"  trained layers: {n_trained:,} parameters; retrieval dim {c.retrieval_dim}",
        ]
        if self.diffusion is not None and c.diffusion is not None and c.mapper is not None:
            lines.append(f"  diffusion: {c.diffusion.source} (conditioning {c.mapper.num_queries}x{c.mapper.out_dim})")
        if self.index is not None:
            lines.append(f"  index: {self.index}")
        return "\n".join(lines)


def resolve_config(name_or_path: str | Path, *, preset: str | None = None) -> ModelConfig | MagicConfig:
    """The config of ``name_or_path`` (its ``weights`` say where the trained layers live); a "magic" preset gives a
    ``MagicConfig``. Published layouts are applied on top of ``preset`` (default: guessed from the args: GILL's
    name ``num_tokens``, FROMAGe's do not)."""
    path = Path(name_or_path)
    if path.is_dir() and (path / ckpt.CONFIG_NAME).is_file():
        cfg = load_config(path)
        if isinstance(cfg, ModelConfig) and cfg.weights == ".":
            cfg = dataclasses.replace(cfg, weights=str(path))
        return cfg
    if path.is_dir() and (path / ckpt.PUBLISHED_ARGS).is_file():
        return _published_config(path, path / ckpt.PUBLISHED_ARGS, preset)
    if path.is_dir():
        raise FileNotFoundError(
            f"{path} holds neither {ckpt.CONFIG_NAME} (this project's format) nor {ckpt.PUBLISHED_ARGS} + "
            f"{ckpt.PUBLISHED_CKPT} (the published FROMAGe/GILL layout)"
        )
    name = str(name_or_path)
    if name in list_presets() or path.suffix == ".json":
        return load_config(name_or_path)
    if name.count("/") == 1 and not path.exists():  # a Hub repo id
        try:
            return resolve_config(fetch_file(name, ckpt.CONFIG_NAME, what="model config").parent, preset=preset)
        except FileNotFoundError:
            raise
        except OSError:
            args = fetch_file(name, ckpt.PUBLISHED_ARGS, what="published model config")
            cfg = _published_config(Path(name), args, preset)
            return dataclasses.replace(cfg, weights=name)
    return load_config(name_or_path)  # raises with the list of presets


def _published_config(where: Path, args_path: Path, preset: str | None) -> ModelConfig:
    try:
        args = json.loads(Path(args_path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{args_path} is not valid JSON: {e}") from None
    if not isinstance(args, dict):
        raise ConfigError(f"{args_path} must hold a JSON object")
    preset = preset or ("gill" if "num_tokens" in args else "fromage")
    base = load_config(preset)
    if not isinstance(base, ModelConfig):
        raise ConfigError(f"preset {preset!r} is a MAGIC preset; a published checkpoint needs a fromage or gill preset")
    cfg = ckpt.config_from_published_args(args, base)
    return dataclasses.replace(cfg, weights=str(where), weights_format="published")


def load_pipeline(
    name_or_path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantization: Quantization = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    weights: str | None = None,
    preset: str | None = None,
    lm: str | None = None,
    vision: str | None = None,
    diffusion: str | None = None,
    load_diffusion_pipeline: bool = True,
    decision_model: bool = True,
    skeleton: bool = False,
    random_weights: bool = False,
) -> Pipeline:
    """Build the frozen components and load the trained layers.

    device / dtype: default CUDA + bfloat16 when available, else CPU + float32.
    quantization: "8bit" / "4bit" loads the LM through bitsandbytes. device_map: e.g. "auto" spreads the LM
    over several GPUs (and CPU) with accelerate; the trained layers and vision encoder stay on ``device``.
    max_memory / offload_folder: passed to accelerate with a device_map, e.g. ``{0: "20GiB", 1: "20GiB", "cpu":
    "60GiB"}``; what does not fit is offloaded to CPU, then to ``offload_folder`` on disk.
    weights: override where the trained layers come from (a directory, a Hub repo, or "random").
    preset: the base preset for a published checkpoint directory (default: guessed from its model_args.json).
    lm / vision / diffusion: override a component's source with a local directory (or another Hub id).
    decision_model: False runs a GILL model without its decision head (e.g. a published checkpoint folder that lacks
    decision_model.pth.tar, which is refused otherwise): every image then follows ``GenerationSettings.mode``.
    random_weights: the model at full size, offline: every backbone built from its shipped architecture with seeded
    random weights (``ModelConfig.with_random_backbones``); the trained layers come from a local folder (``weights``,
    or ``name_or_path`` itself, e.g. a published checkpoint folder, every tensor checked against the real widths),
    else are random: nothing is downloaded.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) or default_dtype(device)
    cfg = resolve_config(name_or_path, preset=preset)
    if not isinstance(cfg, ModelConfig):  # kind "magic": a plain LM + CLIP, no grounded model to build
        raise ConfigError(
            f"{cfg.name!r} is a {cfg.kind!r} preset (a plain LM + CLIP): load it with "
            f"fromage_gill.magic.load_magic, or run `fromage-gill caption IMAGE --model {cfg.name}`"
        )
    if random_weights:
        if lm or vision or diffusion:
            raise ValueError(
                "random_weights builds every backbone from its shipped architecture; it cannot be combined with "
                "lm= / vision= / diffusion= (drop those, or drop random_weights to load the given backbones)"
            )
        cfg = cfg.with_random_backbones()
        if weights is None and not (cfg.weights and Path(checkout_path(cfg.weights)).is_dir()):
            cfg = dataclasses.replace(cfg, weights=RANDOM)  # never download: a Hub repo's layers become random
    if weights is not None:
        fmt = cfg.weights_format
        if weights != RANDOM and Path(weights).is_dir():
            fmt = "published" if (Path(weights) / ckpt.PUBLISHED_CKPT).is_file() else "native"
        cfg = dataclasses.replace(cfg, weights=weights, weights_format=fmt)
    if cfg.weights is not None and cfg.weights != RANDOM and cfg.weights_format == "published":
        args_file = fetch_file(cfg.weights, ckpt.PUBLISHED_ARGS, what="published model config")
        cfg = ckpt.config_from_published_args(json.loads(Path(args_file).read_text()), cfg)
    if not decision_model:
        cfg = dataclasses.replace(cfg, decision_head=False)
    if lm:
        cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, source=lm, config=None))
    if vision:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, source=vision, config=None))
    if diffusion and cfg.diffusion is not None:
        cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, source=diffusion, config=None))
    return build_pipeline(
        cfg,
        device=device,
        dtype=dtype,
        quantization=quantization,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
        load_diffusion_pipeline=load_diffusion_pipeline,
        skeleton=skeleton,
    )


def build_pipeline(
    cfg: ModelConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quantization: Quantization = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    load_diffusion_pipeline: bool = True,
    skeleton: bool = False,
) -> Pipeline:
    """``skeleton``: frozen LM and vision encoder as architecture only (meta device), no diffusion; the trained
    layers are real. For converting and inspecting checkpoints without loading billions of frozen weights."""
    if cfg.weights is None:
        raise ValueError(
            f"{cfg.name!r} names no trained weights. {cfg.description} "
            f"Pass weights=DIR (or --weights DIR), or weights='random' to start training from scratch."
        )
    config, cfg = cfg, in_checkout(cfg)  # the Pipeline keeps the portable "repo:" paths; loading uses real ones
    logger.info("loading %s: tokenizer", cfg.name)
    tokenizer = load_tokenizer(cfg.lm)
    image_token_ids = add_image_tokens(tokenizer, cfg.image_tokens)
    logger.info("loading %s: language model %s", cfg.name, cfg.lm.source)
    lm = load_lm(
        cfg.lm,
        tokenizer,
        dtype=dtype,
        device=device,
        device_map=device_map,
        quantization=quantization,
        seed=cfg.seed,
        skeleton=skeleton,
        max_memory=max_memory,
        offload_folder=offload_folder,
    )
    logger.info("loading %s: vision encoder %s", cfg.name, cfg.vision.source)
    vision = load_vision(cfg.vision, dtype=dtype, device=device, seed=cfg.seed, skeleton=skeleton)
    torch.manual_seed(cfg.seed + 3)  # the trained layers' initial values are reproducible
    model = GroundedLM(cfg, lm, vision, image_token_ids)
    if cfg.weights != RANDOM:
        logger.info("loading %s: trained layers from %s", cfg.name, cfg.weights)
        load_weights(model, cfg)
    model.trained_layers_to(device, dtype).eval()
    sd = None
    if cfg.diffusion is not None and load_diffusion_pipeline and not skeleton:
        logger.info("loading %s: diffusion %s", cfg.name, cfg.diffusion.source)
        sd = load_diffusion(cfg.diffusion, tokenizer, dtype=dtype, device=device, seed=cfg.seed)
        enc_width = sd.text_encoder.config.hidden_size
        if cfg.mapper is None:
            raise ConfigError(f"{cfg.name!r} has a diffusion model but no mapper to condition it; add a mapper section")
        if enc_width != cfg.mapper.out_dim:
            raise ConfigError(
                f"mapper.out_dim is {cfg.mapper.out_dim} but the diffusion text encoder is {enc_width} wide; "
                f"set mapper.out_dim to {enc_width} or use a matching diffusion model"
            )
    return Pipeline(config=config, model=model, tokenizer=tokenizer, diffusion=sd, device=device, dtype=dtype)


def in_checkout(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every ``repo:`` source (LM, tokenizer, vision, diffusion, weights) made an absolute path."""
    lm = dataclasses.replace(cfg.lm, source=checkout_path(cfg.lm.source), tokenizer=checkout_path(cfg.lm.tokenizer))
    vision = dataclasses.replace(cfg.vision, source=checkout_path(cfg.vision.source))
    diffusion = cfg.diffusion and dataclasses.replace(cfg.diffusion, source=checkout_path(cfg.diffusion.source))
    return dataclasses.replace(cfg, lm=lm, vision=vision, diffusion=diffusion, weights=checkout_path(cfg.weights))


def load_weights(model: GroundedLM, cfg: ModelConfig) -> None:
    if cfg.weights is None:  # load_pipeline refuses it first, with the fix; a direct caller gets told too
        raise ValueError(f"{cfg.name!r} names no trained weights to load (pass weights=DIR)")
    if cfg.weights_format == "native":
        path = fetch_file(cfg.weights, ckpt.WEIGHTS_NAME, what="trained layers")
        ckpt.load_trained_layers(model, ckpt.read_native(path), source=str(path))
        return
    directory = Path(fetch_file(cfg.weights, ckpt.PUBLISHED_CKPT, what="published checkpoint")).parent
    if cfg.decision_head:
        with contextlib.suppress(OSError):  # downloaded when the repo has it; read_published refuses it missing
            fetch_file(cfg.weights, ckpt.PUBLISHED_DECISION, what="decision model")
    state, names = ckpt.read_published(directory, model)
    ckpt.load_trained_layers(model, state, source=str(directory / ckpt.PUBLISHED_CKPT), names=names)


def add_image_tokens(tokenizer, tokens: tuple[str, ...]) -> list[int]:
    """Append the image tokens to the vocabulary (as special tokens: never split, never merged with text)."""
    from tokenizers import AddedToken

    n_base = len(tokenizer)
    present = [t for t in tokens if t in tokenizer.get_vocab()]
    if present:
        raise ValueError(f"the tokenizer already has {present}; image tokens must be new tokens")
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if ids != list(range(n_base, n_base + len(tokens))):
        raise ValueError(f"image tokens got ids {ids}, expected {n_base}..{n_base + len(tokens) - 1}")
    return ids
