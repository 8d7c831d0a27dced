"""Starting the app on a Hugging Face Space: fetch what the model needs, once, where it persists; ZeroGPU.

On a Space (``SPACE_ID`` is set) ``space_argv`` runs before the app reads its flags:

1. the cache: ``$HF_HOME/hub`` when the Space sets HF_HOME, else ``/data/.huggingface/hub`` when persistent storage
   is mounted at ``/data`` (so a restart does not download 17 GB again), else huggingface_hub's default;
2. the weights, with huggingface_hub's progress bars: the trained layers (``jykoh/gill``), OPT-6.7B, CLIP
   ViT-L/14 and Stable Diffusion v1.5, only the files loading reads (safetensors when the repo has them, never the
   7 GB single-file SD checkpoints);
3. the published CC3M embeddings, when ``FROMAGE_GILL_EMBEDDINGS`` names them (a local file or
   ``hf://[datasets/|spaces/]REPO/PATH``; the authors distribute them outside the Hub), imported once into an index
   folder beside the cache; the index is fingerprinted by the published model at the first start;
4. the app's flags: the model and its components as local folders (nothing is fetched again while loading), the
   index, and ``FROMAGE_GILL_ARGS`` (e.g. ``--load-8bit`` on a 16 GB T4).

``gpu(fn)`` is ``spaces.GPU(fn)`` when the ``spaces`` package is installed (ZeroGPU: a GPU is attached for each
call) and ``fn`` itself elsewhere; ``use_zero_gpu`` applies it to the chat handlers that run the model.
Gradio-free: the app calls these in a few lines; docs/spaces.md says how to deploy.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig, load_config

logger = logging.getLogger(__name__)

PERSISTENT = Path("/data")  # where a Space mounts persistent storage
# What loading reads from each kind of repo (everything else in them is other frameworks' copies or single-file
# checkpoints). Safetensors first; a repo that has none gets its .bin weights instead.
CONFIG_FILES = ["*.json", "*.txt", "*.model", "tokenizer*", "vocab*", "merges*"]
SD_FILES = ["scheduler/*", "tokenizer/*", "feature_extractor/*"] + [
    f"{p}/config.json" for p in ("unet", "vae", "text_encoder", "safety_checker")
]
# one copy of each part's weights (the repo also holds fp16, non-EMA and single-file copies: 10+ GB more)
SD_WEIGHTS = {
    ext: [f"unet/diffusion_pytorch_model.{ext}", f"vae/diffusion_pytorch_model.{ext}"]
    + [f"{p}/{'model' if ext == 'safetensors' else 'pytorch_model'}.{ext}" for p in ("text_encoder", "safety_checker")]
    for ext in ("safetensors", "bin")
}
GPU_METHODS = ("send", "regenerate", "edit", "edit_shown")  # the ChatHandlers methods that run the model
DEFAULT_GPU_SECONDS = 120  # ZeroGPU's per-call budget for a turn (GILL's 50 denoising steps included)


@dataclass(frozen=True)
class SpaceAssets:
    """What a Space start fetched: local folders for each part, and where they are cached."""

    cache_dir: Path | None  # None: huggingface_hub's default cache
    persistent: bool  # the cache survives a restart (persistent storage or HF_HOME)
    weights: Path  # the trained layers (a published or native checkpoint folder)
    lm: Path
    vision: Path
    diffusion: Path | None
    index: Path | None  # the imported CC3M index folder, or None when no embeddings were named


def on_space(env: Mapping[str, str] = os.environ) -> bool:
    return bool(env.get("SPACE_ID"))


def cache_dir(env: Mapping[str, str] = os.environ, persistent: Path = PERSISTENT) -> tuple[Path | None, bool]:
    """(the hub cache folder to download into, whether it persists). Explicit, not through HF_HOME alone:
    huggingface_hub reads HF_HOME once, when gradio imports it, long before this runs."""
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub", True
    if persistent.is_dir() and os.access(persistent, os.W_OK):
        return persistent / ".huggingface" / "hub", True
    return None, False


def _snapshot(repo: str, patterns: list[str], cache: Path | None, download: Callable[..., str]) -> Path:
    return Path(download(repo_id=repo, allow_patterns=patterns, cache_dir=cache))


def fetch_repo(
    repo: str, cache: Path | None, *, diffusers: bool = False, download: Callable[..., str] | None = None
) -> Path:
    """A local snapshot of ``repo`` with what loading reads; progress bars from huggingface_hub."""
    if Path(repo).is_dir():
        return Path(repo)
    if download is None:
        from huggingface_hub import snapshot_download as download
    configs = (SD_FILES if diffusers else []) + CONFIG_FILES
    logger.info("fetching %s (only the files loading reads)", repo)
    path = _snapshot(repo, configs + (SD_WEIGHTS["safetensors"] if diffusers else ["*.safetensors"]), cache, download)
    if not any(path.rglob("*.safetensors")):
        logger.info("%s has no safetensors weights; fetching its .bin weights", repo)
        path = _snapshot(repo, configs + (SD_WEIGHTS["bin"] if diffusers else ["*.bin"]), cache, download)
    return path


def fetch_embeddings(spec: str, cache: Path | None, download: Callable[..., str] | None = None) -> Path:
    """``FROMAGE_GILL_EMBEDDINGS``: a local file, or ``hf://[datasets/|spaces/]OWNER/NAME/PATH/IN/REPO``."""
    if not spec.startswith("hf://"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(
                f"FROMAGE_GILL_EMBEDDINGS={spec!r}: no such file; give a local path or hf://[datasets/]OWNER/NAME/FILE"
            )
        return path
    parts = spec[len("hf://") :].split("/")
    repo_type = None
    if parts and parts[0] in ("datasets", "spaces", "models"):
        repo_type = parts.pop(0).removesuffix("s")
    if len(parts) < 3:
        raise ValueError(
            f"FROMAGE_GILL_EMBEDDINGS={spec!r}: expected hf://[datasets/|spaces/]OWNER/NAME/PATH (the file inside "
            f"the repo), e.g. hf://datasets/me/gill-cc3m/cc3m_embeddings_urls.npy"
        )
    if download is None:
        from huggingface_hub import hf_hub_download as download
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    logger.info("fetching the CC3M embeddings %s from %s", filename, repo)
    return Path(download(repo_id=repo, filename=filename, repo_type=repo_type, cache_dir=cache))


def prepare_space(
    model: str = "gill",
    env: Mapping[str, str] = os.environ,
    *,
    persistent: Path = PERSISTENT,
    snapshot: Callable[..., str] | None = None,
    file_download: Callable[..., str] | None = None,
    import_embeddings: Callable[[Path, Path, str, SpaceAssets], None] | None = None,
) -> SpaceAssets:
    """Fetch everything ``model`` (a preset naming Hub repos) needs into the Space's cache. ``snapshot`` /
    ``file_download`` stand in for huggingface_hub's (tests); ``import_embeddings(pickle, out, model, assets)``
    writes the index folder (default: ``index_embeddings``, which loads the model's retrieval layers)."""
    cfg = load_config(model)
    if not isinstance(cfg, ModelConfig) or cfg.weights in (None, "random"):
        raise ValueError(f"--model {model!r} names no published weights to fetch; a Space runs gill or fromage")
    cache, persists = cache_dir(env, persistent)
    if not persists:
        logger.warning(
            "no persistent storage (/data) and no HF_HOME: the weights are downloaded again at every restart; "
            "enable persistent storage in the Space settings"
        )
    fetch = functools.partial(fetch_repo, download=snapshot)
    assets = SpaceAssets(
        cache_dir=cache,
        persistent=persists,
        weights=fetch(cfg.weights, cache),
        lm=fetch(cfg.lm.source, cache),
        vision=fetch(cfg.vision.source, cache),
        diffusion=fetch(cfg.diffusion.source, cache, diffusers=True) if cfg.diffusion else None,
        index=None,
    )
    spec = env.get("FROMAGE_GILL_EMBEDDINGS")
    if not spec:
        logger.warning(
            "FROMAGE_GILL_EMBEDDINGS is not set: the app starts without the CC3M index (images are generated, "
            "never retrieved); see docs/spaces.md"
        )
        return assets
    out = (cache.parent if cache else Path.home() / ".cache" / "fromage_gill") / "indexes" / f"{cfg.name}-cc3m"
    if not (out / "index.json").is_file():
        pickle_path = fetch_embeddings(spec, cache, file_download)
        (import_embeddings or index_embeddings)(pickle_path, out, model, assets)
    return dataclasses.replace(assets, index=out)


def index_embeddings(pickle_path: Path, out: Path, model: str, assets: SpaceAssets) -> None:
    """Import the published pickle into an index folder fingerprinted by the model whose layers made it. Only the
    trained layers are needed: the backbones are built as architecture only (no memory)."""
    from ..pipeline import load_pipeline
    from ..retrieve import import_published

    pipe = load_pipeline(
        model, weights=str(assets.weights), lm=str(assets.lm), vision=str(assets.vision), skeleton=True
    )
    cfg = pipe.config
    out.parent.mkdir(parents=True, exist_ok=True)
    report = import_published(
        [pickle_path],
        out,
        fingerprint=pipe.model.retrieval_fingerprint(),
        trust_pickle=True,  # the operator named this file in the Space's settings
        expected_dim=cfg.retrieval_dim,
        model=cfg.name,
        dtype="float16",  # half the memory; retrieval scores differ by < 1e-3
    )
    logger.info("imported %d CC3M embeddings into %s", report.count, out)


def app_flags(model: str, assets: SpaceAssets, env: Mapping[str, str] = os.environ) -> list[str]:
    """The app's flags for what ``prepare_space`` fetched, then ``FROMAGE_GILL_ARGS``."""
    flags = ["--model", model, "--weights", str(assets.weights), "--lm", str(assets.lm), "--vision", str(assets.vision)]
    if assets.diffusion is not None:
        flags += ["--diffusion", str(assets.diffusion)]
    if assets.index is not None:
        flags += ["--index", f"cc3m={assets.index}"]
    return flags + shlex.split(env.get("FROMAGE_GILL_ARGS", ""))


def space_argv(argv: Sequence[str] | None, env: Mapping[str, str] = os.environ, **prepare: Any) -> list[str]:
    """The app's flags: ``argv`` (None: the command line) unchanged off a Space or when flags were given; on a Space
    started bare (``python app.py``), the flags for the fetched model (``FROMAGE_GILL_MODEL``, default gill), with
    ZeroGPU applied when ``spaces`` is installed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not on_space(env) or argv:
        return argv
    model = env.get("FROMAGE_GILL_MODEL", "gill")
    assets = prepare_space(model, env, **prepare)
    use_zero_gpu()
    return app_flags(model, assets, env)


# ------------------------------------------------------------------------------------------ ZeroGPU


def _spaces_module():
    try:
        return importlib.import_module("spaces")
    except ImportError:
        return None


def gpu(fn: Callable[..., object] | None = None, *, duration: int = DEFAULT_GPU_SECONDS) -> Callable[..., object]:
    """``spaces.GPU(duration=...)(fn)`` when the ``spaces`` package is installed (ZeroGPU attaches a GPU for each
    call), else ``fn`` unchanged. Usable bare (``@gpu``) or with arguments (``@gpu(duration=60)``)."""
    if fn is None:
        return functools.partial(gpu, duration=duration)
    spaces = _spaces_module()
    if spaces is None:
        return fn
    return spaces.GPU(duration=duration)(fn)


def use_zero_gpu(handlers_cls: type | None = None, *, duration: int = DEFAULT_GPU_SECONDS) -> bool:
    """Wrap the chat handlers that run the model (``GPU_METHODS``) with ``gpu``; False (nothing changed) when
    ``spaces`` is not installed. Idempotent."""
    if _spaces_module() is None:
        return False
    if handlers_cls is None:
        from .handlers import ChatHandlers as handlers_cls
    for name in GPU_METHODS:
        method = getattr(handlers_cls, name)  # AttributeError: a renamed handler must be listed in GPU_METHODS
        if not getattr(method, "_fromage_gill_gpu", False):
            wrapped = gpu(method, duration=duration)
            vars(wrapped)["_fromage_gill_gpu"] = True
            setattr(handlers_cls, name, wrapped)
    return True
