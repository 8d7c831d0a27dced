"""The frozen components: causal LM + tokenizer, vision encoder, Stable Diffusion.

Each comes from a Hub id or local directory through the library's own ``from_pretrained`` (with dtype,
``device_map`` and bitsandbytes quantization for the LM), or, for ``source == "random"``, is built from an
inline config with seeded random weights so that tests and the offline presets never need the network.
"""

from __future__ import annotations

import gc
import logging
import tempfile
from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import nn

from .config import RANDOM, ClipSpec, DiffusionSpec, LMSpec, VisionSpec
from .hub import from_hub_or_path
from .images import CLIP_MEAN, CLIP_STD, ImageProcessor
from .typed_json import ConfigError, JSONValue

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from transformers import (
        BitsAndBytesConfig,
        CLIPVisionModel,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

logger = logging.getLogger(__name__)

Quantization = Literal["8bit", "4bit"] | None

# Lines that importing diffusers / transformers / faiss prints at every command and are not the user's business:
# bitsandbytes (imported by diffusers' quantizers whether or not anything is quantized) tries to fetch a CPU 4-bit
# kernel from the Hub, and faiss's loader reports each SIMD build it could not load before the one it uses.
for _noisy, _level in {
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
    "kernels._internals.hf_hub": logging.ERROR,
    "faiss.loader": logging.WARNING,
}.items():
    logging.getLogger(_noisy).setLevel(_level)


def inline_config(spec: LMSpec | VisionSpec | DiffusionSpec | ClipSpec) -> Mapping[str, JSONValue]:
    """The inline config a ``source == "random"`` component is built from (the spec's validation requires it)."""
    if spec.config is None:
        raise ValueError(f"{spec.source!r} needs an inline config to be built with random weights")
    return spec.config


def input_embeddings(lm: PreTrainedModel) -> nn.Embedding:
    """The LM's token embedding table. transformers types it as any Module; every causal LM we load uses an
    ``nn.Embedding`` (or a subclass), whose ``num_embeddings`` / ``embedding_dim`` / ``weight`` we read."""
    return cast("nn.Embedding", lm.get_input_embeddings())


# ------------------------------------------------------------------------------------------ tokenizer


def load_tokenizer(spec: LMSpec) -> PreTrainedTokenizerBase:
    """The LM's tokenizer. For a random LM: a byte-level BPE trained on the shipped corpus (deterministic)."""
    from transformers import AutoTokenizer

    if spec.source == RANDOM and spec.tokenizer is None:
        return train_tiny_tokenizer(int(inline_config(spec).get("vocab_size", 512)))
    source = spec.tokenizer or spec.source
    tok = from_hub_or_path("tokenizer", source, lambda s: AutoTokenizer.from_pretrained(s, revision=spec.revision))
    if tok.pad_token is None:
        # Many LMs (LLaMA, Mistral, GPT-2) ship no pad token. Padding positions are masked out everywhere,
        # so reusing EOS is safe and, unlike adding a token, leaves the vocabulary (and the LM) unchanged.
        tok.pad_token = tok.eos_token
    return tok


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id put at padded positions: the tokenizer's pad token, else EOS, else 0. Padded positions are always
    masked out of attention and labels, so any id works; one rule keeps every batch built the same way."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(tid, int):  # None when the tokenizer has no such token
            return tid
    return 0


def train_tiny_tokenizer(vocab_size: int, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (resources.files("fromage_gill") / "presets" / "tiny_corpus.txt").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


# ------------------------------------------------------------------------------------------ language model


def load_lm(
    spec: LMSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    device_map: str | dict | None = None,
    quantization: Quantization = None,
    seed: int = 0,
    skeleton: bool = False,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
) -> PreTrainedModel:
    """A frozen causal LM in eval mode. ``device_map`` (e.g. "auto") spreads it with accelerate.
    ``skeleton``: only the architecture, on the meta device (no weights read): enough to check and convert
    checkpoints of the trained layers without the memory a 7B LM needs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if skeleton:
        if spec.source == RANDOM:
            config = AutoConfig.for_model(**dict(inline_config(spec)))
        else:
            config = from_hub_or_path(
                "language model config", spec.source, lambda s: AutoConfig.from_pretrained(s, revision=spec.revision)
            )
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)

    kwargs: dict[str, object] = {"dtype": dtype}
    if quantization is not None:
        kwargs["quantization_config"] = _bnb_config(quantization, dtype)
        kwargs["device_map"] = device_map or {"": str(device)}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None or offload_folder is not None:
        if "device_map" not in kwargs:
            raise ValueError("max_memory / offload_folder need a device_map (e.g. device_map='auto')")
        kwargs.update(max_memory=max_memory, offload_folder=offload_folder)

    if spec.source == RANDOM:
        cfg = dict(inline_config(spec))
        cfg.update(
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        config = AutoConfig.for_model(**cfg)
        torch.manual_seed(seed)
        # Initialised in float32 (the values every test fixes) unless that will not fit: a full-size LM (OPT-6.7B:
        # 26.6 GB in float32) is initialised in the dtype it runs in, so building never needs more than it holds.
        n_params = _n_params(config)
        init_dtype = torch.float32 if n_params < _INIT_FP32_MAX else dtype
        check_fits_in_memory("lm.config", n_params, init_dtype)
        lm = AutoModelForCausalLM.from_config(config, dtype=init_dtype)
        if kwargs.keys() - {"dtype"}:
            # Quantization and device maps are applied by from_pretrained; send the random model through the
            # very same loader the published weights take.
            # The directory lives as long as the model: accelerate may offload weights by pointing into its files.
            tmp = tempfile.TemporaryDirectory(prefix="fromage_gill_random_lm_")
            lm.save_pretrained(tmp.name)
            del lm  # freed before the reload, so the peak is one copy of the LM, not two
            gc.collect()
            lm = AutoModelForCausalLM.from_pretrained(tmp.name, **kwargs)
            vars(lm)["_fromage_gill_weights_dir"] = tmp  # not a submodule: nn.Module.__setattr__ is for those
        else:
            lm = lm.to(device=device, dtype=dtype)
    else:
        lm = from_hub_or_path(
            "language model",
            spec.source,
            lambda s: AutoModelForCausalLM.from_pretrained(s, revision=spec.revision, **kwargs),
        )
        if "device_map" not in kwargs:
            cast(nn.Module, lm).to(device)  # in place (transformers' typing of .to is generation's)
    lm.eval().requires_grad_(False)
    return lm


_INIT_FP32_MAX = 500_000_000  # parameters; above this a random LM is initialised in its own dtype


def check_fits_in_memory(part: str, n_params: int, dtype: torch.dtype) -> None:
    """Refuse a random backbone whose inline config describes more weights than this machine's free memory,
    before they are allocated (an inline hidden_size of 10**9 would otherwise end in the allocator's own error).
    Random weights are made on the CPU whatever the device, so the CPU's memory is what bounds them."""
    need = n_params * torch.empty((), dtype=dtype).element_size()
    free = _available_memory()
    if free is not None and need > free:
        raise ConfigError(
            f"{part} describes a model of {n_params:,} parameters ({need / 1e9:,.1f} GB in {dtype}), more than "
            f"the {free / 1e9:,.1f} GB of memory available here; reduce its sizes (hidden_size, layers, vocab_size)"
        )


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _n_params(config: PretrainedConfig) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def cache_argument(base: nn.Module) -> str:
    """The name ``base.forward`` takes the KV cache by: ``cache`` from transformers 5.24 on, ``past_key_values``
    before (5.24 still takes the old name but warns on every call, and 5.40 drops it). Outputs carry the cache
    under the same name."""
    import inspect

    forward = type(base).forward
    name = _CACHE_ARGUMENT.get(forward)
    if name is None:
        name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        _CACHE_ARGUMENT[forward] = name
    return name


_CACHE_ARGUMENT: dict[object, str] = {}  # forward function -> its cache argument's name


def _bnb_config(quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig:
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
    raise ValueError(f"quantization must be '8bit', '4bit' or None, got {quantization!r}")


# ------------------------------------------------------------------------------------------ vision


class VisionEncoder(nn.Module):
    """A frozen image encoder with one feature vector per image, and the preprocessing that goes with it."""

    def __init__(self, backbone: nn.Module, backend: str, out_dim: int, processor: ImageProcessor):
        super().__init__()
        self.backbone = backbone
        self.backend = backend
        self.out_dim = out_dim
        self.processor = processor

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, out_dim)
        param = next(self.backbone.parameters())
        pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        if self.backend == "hf_clip":
            return self.backbone(pixel_values=pixel_values).pooler_output  # post-layernorm CLS, as published
        return self.backbone(pixel_values)  # open_clip visual tower: projected image embedding


# A full CLIP checkpoint (the published ones, the toy's) also holds the text tower: not the vision model's, and not
# worth the load report transformers prints about them at every start
_CLIP_TEXT_KEYS = ("text_model.", "text_projection.", "logit_scale", "visual_projection.")


def _clip_vision_from_pretrained(
    source: str, *, revision: str | None, dtype: torch.dtype
) -> tuple[CLIPVisionModel, dict[str, list[str]]]:
    """CLIPVisionModel.from_pretrained without transformers' load report (``_check_clip_vision`` says what
    matters), and what it loaded."""
    from transformers import CLIPVisionModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # "main" is from_pretrained's own default revision
        loaded = CLIPVisionModel.from_pretrained(
            source, dtype=dtype, output_loading_info=True, revision=revision if revision is not None else "main"
        )
        return cast("tuple[CLIPVisionModel, dict[str, list[str]]]", loaded)
    finally:
        hf_logging.set_verbosity(verbosity)


def _check_clip_vision(source: str, info: dict[str, list[str]]) -> None:
    """Quiet about a full CLIP checkpoint's text tower, strict about the vision tower: a missing or mis-shaped
    vision weight is an error naming it."""
    missing, mismatched = list(info.get("missing_keys", [])), list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ValueError(
            f"vision encoder {source}: not a CLIP vision tower of this architecture: missing "
            f"{sorted(missing)[:8]}, shape-mismatched {sorted(map(str, mismatched))[:8]}; point "
            "vision.source at a CLIP checkpoint (a CLIPModel or CLIPVisionModel directory)"
        )
    other = sorted(k for k in info.get("unexpected_keys", []) if not k.startswith(_CLIP_TEXT_KEYS))
    if other:
        logger.warning("vision encoder %s: %d weight(s) not used: %s", source, len(other), other[:8])


def load_vision(
    spec: VisionSpec, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0, skeleton: bool = False
) -> VisionEncoder:
    if spec.backend == "hf_clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if skeleton:
            config = (
                CLIPVisionConfig(**inline_config(spec))
                if spec.source == RANDOM
                else from_hub_or_path(
                    "vision encoder config",
                    spec.source,
                    lambda s: CLIPVisionConfig.from_pretrained(s, revision=spec.revision or "main"),
                )
            )
            with torch.device("meta"):
                model = CLIPVisionModel(config)
            processor = ImageProcessor(size=image_side(config.image_size))
            return VisionEncoder(model.eval().requires_grad_(False), "hf_clip", config.hidden_size, processor)
        if spec.source == RANDOM:
            config = CLIPVisionConfig(**inline_config(spec))
            with torch.device("meta"):
                n_params = sum(p.numel() for p in CLIPVisionModel(config).parameters())
            check_fits_in_memory("vision.config", n_params, torch.float32)
            torch.manual_seed(seed + 1)
            model = CLIPVisionModel(config)
        else:
            model, info = from_hub_or_path(
                "vision encoder",
                spec.source,
                lambda s: _clip_vision_from_pretrained(s, revision=spec.revision, dtype=dtype),
            )
            _check_clip_vision(spec.source, info)  # here, not in the loader: a hub error it is not
        processor = ImageProcessor(size=image_side(model.config.image_size), mean=CLIP_MEAN, std=CLIP_STD)
        out_dim = model.config.hidden_size
    elif spec.backend == "open_clip":
        import open_clip

        if spec.source == RANDOM:
            torch.manual_seed(seed + 1)
            cfg = dict(inline_config(spec))
            full = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
        else:
            full = from_hub_or_path(
                "open_clip model",
                spec.source,
                lambda s: open_clip.create_model(s, pretrained=spec.pretrained),
            )
        # open_clip's visual towers (ViT, ModifiedResNet, timm) share no typed base class with these attributes
        model = cast(nn.Module, full.visual)
        size = image_side(getattr(model, "image_size"))  # noqa: B009
        pp = getattr(model, "preprocess_cfg", {}) or {}
        processor = ImageProcessor(size=size, mean=tuple(pp.get("mean", CLIP_MEAN)), std=tuple(pp.get("std", CLIP_STD)))
        out_dim = int(getattr(model, "output_dim"))  # noqa: B009
    else:  # validated by the config; kept for a clear message if a caller builds a spec by hand
        raise ValueError(f"vision.backend must be 'hf_clip' or 'open_clip', got {spec.backend!r}")
    backbone = cast(nn.Module, model)  # transformers' typing of .to is generation's
    backbone.to(device=device, dtype=dtype).eval().requires_grad_(False)  # in place
    return VisionEncoder(backbone, spec.backend, out_dim, processor)


def image_side(image_size: object) -> int:
    """A square image's side from a config's ``image_size`` (an int, or a (height, width) pair)."""
    if isinstance(image_size, int):
        return image_size
    assert isinstance(image_size, list | tuple), f"image_size {image_size!r}"
    return int(image_size[0])


# ------------------------------------------------------------------------------------------ diffusion


def sd_scheduler() -> DDIMScheduler:
    """Stable Diffusion v1's DDIM scheduler (its published ``scheduler_config.json``), for pipelines built here."""
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def load_diffusion(
    spec: DiffusionSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
) -> StableDiffusionPipeline:
    """A diffusers StableDiffusionPipeline (frozen). ``tokenizer`` is used only for a random text encoder."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    if spec.source == RANDOM:
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(seed + 2)
        cfg = inline_config(spec)
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        scheduler = sd_scheduler()
        sd_tok = train_tiny_tokenizer(
            int(cfg["text_encoder"].get("vocab_size", 512)),
            model_max_length=int(cfg["text_encoder"].get("max_position_embeddings", 77)),
        )
        # diffusers annotates a CLIPTokenizer, a Karras scheduler and a safety checker; it takes any tokenizer,
        # DDIM, and None for the checker and feature extractor (requires_safety_checker=False)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=sd_tok,  # pyright: ignore[reportArgumentType]
            unet=unet,
            scheduler=scheduler,  # pyright: ignore[reportArgumentType]
            safety_checker=None,  # pyright: ignore[reportArgumentType]
            feature_extractor=None,  # pyright: ignore[reportArgumentType]
            requires_safety_checker=False,
        )
    else:
        extra = {} if spec.safety_checker else {"safety_checker": None, "requires_safety_checker": False}
        pipe = from_hub_or_path(
            "Stable Diffusion pipeline",
            spec.source,
            lambda s: StableDiffusionPipeline.from_pretrained(s, revision=spec.revision, dtype=dtype, **extra),
        )
    # from_pretrained already loaded in `dtype`; casting again makes diffusers warn about fp32-only modules.
    pipe = pipe.to(device=device) if spec.source != RANDOM or dtype == torch.float32 else pipe.to(device, dtype)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
