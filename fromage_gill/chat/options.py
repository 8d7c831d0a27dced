"""How the app is started: its command-line flags (shared by ``python app.py`` and ``fromage-gill serve``),
``AppOptions`` (how it serves), and loading what the flags name (the model, its indexes, MAGIC's CLIP).

Gradio-free, and free of ``fromage_gill.commands``: ``fromage-gill serve`` runs ``app.py``, which reads its flags
from here, so neither imports the other's side.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from ..backbones import Quantization
from ..pipeline import Pipeline, load_pipeline
from .messages import MAX_IMAGES_PER_MESSAGE

if TYPE_CHECKING:
    from ..retrieve.index import ImageIndex

DEFAULT_MODEL = "gill"  # the published GILL model; offline, use --model toy-gill


def default_cache_dir() -> Path:
    """Where the app keeps the images it shows and the conversations it restores after a reload or a restart:
    $FROMAGE_GILL_APP_CACHE, else the user's data folder (``$XDG_DATA_HOME/fromage_gill``, by default
    ``~/.local/share/fromage_gill`` on Linux; platformdirs knows macOS's and Windows'). Never a shared temporary
    folder, where its name would be predictable to every local user; the store makes it private (0700)."""
    from platformdirs import user_data_dir  # when used: the CLI's parser imports this module

    return Path(os.environ.get("FROMAGE_GILL_APP_CACHE") or user_data_dir("fromage_gill", appauthor=False))


def default_db_url() -> str | None:
    """$FROMAGE_GILL_DB_URL (e.g. ``postgresql://user@host/db``, for replicas sharing one store), else None: SQLite
    in the data folder."""
    return os.environ.get("FROMAGE_GILL_DB_URL") or None


@dataclasses.dataclass(frozen=True)
class AppOptions:
    """How the app serves: queue size, model concurrency, the indexes to choose from, default settings."""

    max_queue: int = 16
    concurrency: int = 8  # turns decoded together: the shared engine's batch (and the model gate's slots)
    kv_cache_gb: float = 1.0  # the engine's prefix cache of the conversations' KV, all sessions together
    indexes: Mapping[str, ImageIndex] | None = None  # None = the pipeline's own index
    defaults: Mapping[str, object] = dataclasses.field(default_factory=dict)  # GenerationSettings overrides
    max_images_per_message: int = MAX_IMAGES_PER_MESSAGE
    session_ttl_s: float = 6 * 3600
    cache_dir: Path = dataclasses.field(default_factory=default_cache_dir)
    conversation_ttl_s: float = 7 * 24 * 3600  # a stored conversation not touched for this long is deleted
    db_url: str | None = dataclasses.field(default_factory=default_db_url)  # None: SQLite in cache_dir
    max_exports: int = 2  # exports being written at once; more are refused with "busy, try again"

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"--max-queue must be >= 1, got {self.max_queue}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.kv_cache_gb >= 0:
            raise ValueError(f"--kv-cache-gb must be >= 0 (0: no prefix cache), got {self.kv_cache_gb}")
        if self.max_exports < 1:
            raise ValueError(f"max_exports must be >= 1, got {self.max_exports}")
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))


def loading_line(model: str) -> str:
    """The line printed while the model loads: the first start of a published model downloads its weights; the
    toy and tiny presets ship theirs (or need none), and a folder is already here."""
    local = model.startswith(("toy-", "tiny-")) or Path(model).is_dir()
    return f"loading {model} (progress below" + (")" if local else "; the first start downloads the weights)")


def offline_hint(model: str) -> str:
    """What to do when the model's weights are neither here nor reachable."""
    return (
        f"the {model!r} weights are not on this machine and the Hugging Face Hub is unreachable; for the offline "
        "demo run: python app.py --model toy-gill  (details: add -v)"
    )


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The app's flags (shared by ``python app.py`` and ``fromage-gill serve``)."""
    add_model_args(p, default=os.environ.get("FROMAGE_GILL_MODEL", DEFAULT_MODEL))
    p.add_argument(
        "--index",
        action="append",
        metavar="[NAME=]DIR",
        help="image index directory to retrieve from; repeat to offer a choice in the app (default: the "
        "shipped index of a tiny preset, if any)",
    )
    p.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to listen on (0.0.0.0 to accept other machines; default 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        help="port to listen on (default 7860)",
    )
    p.add_argument("--share", action="store_true", help="also serve on a temporary public gradio.live link")
    p.add_argument("--api", action="store_true", help="also serve the OpenAI-compatible API at /v1 (docs/serving.md)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests that may wait for the model; more are refused with 'queue is full' (default 16)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="visitors' turns decoded together in one batch; more wait their turn (default 8)",
    )
    p.add_argument(
        "--kv-cache-gb",
        type=float,
        default=1.0,
        help="memory for the conversations' cached KV, all visitors together, GB (default 1)",
    )
    p.add_argument(
        "--db-url",
        default=default_db_url(),
        help="database of the stored conversations, e.g. postgresql://user:password@host/db to share one store "
        "between replicas (their data folders must then be shared too); default $FROMAGE_GILL_DB_URL, else "
        "SQLite in the data folder ($FROMAGE_GILL_APP_CACHE, else ~/.local/share/fromage_gill)",
    )
    p.add_argument(
        "--clip",
        metavar="SOURCE",
        help="full CLIP (vision and text) for the 'magic' decoding: a Hub id or directory of a "
        "transformers CLIPModel, or a MAGIC preset such as tiny-magic (default: none; 'magic' then "
        "says in the chat how to add one)",
    )


def add_model_args(p: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """The model-loading flags of the app and of every sub-command that loads a model (``commands/common.py``
    takes them from here, so that app.py never imports the commands)."""
    p.add_argument(
        "--model",
        required=default is None,
        default=default,
        help="preset name (see `fromage-gill presets`), model directory, or Hub repo id",
    )
    p.add_argument("--weights", help="trained layers to use instead of the model's own (directory, repo or 'random')")
    p.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPU, fp32 on CPU")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--load-8bit", action="store_true", help="load the LM in 8-bit (bitsandbytes)")
    q.add_argument("--load-4bit", action="store_true", help="load the LM in 4-bit NF4 (bitsandbytes)")
    p.add_argument("--device-map", help="e.g. 'auto' to spread the LM over several GPUs / CPU with accelerate")
    p.add_argument("--lm", help="local directory (or Hub id) to use for the language model")
    p.add_argument("--vision", help="local directory (or Hub id) to use for the vision encoder")
    p.add_argument("--diffusion", help="local directory (or Hub id) to use for Stable Diffusion")
    p.add_argument(
        "--no-decision-model",
        dest="decision_model",
        action="store_false",
        help="run GILL without its decision head (e.g. no decision_model.pth.tar): every image follows "
        "the mode setting",
    )


class PipelineKwargs(TypedDict):
    """``load_pipeline``'s keyword arguments that the ``add_model_args`` flags set (the model name aside)."""

    device: str | None
    dtype: str | None
    quantization: Quantization
    device_map: str | None
    weights: str | None
    lm: str | None
    vision: str | None
    diffusion: str | None
    decision_model: bool


def pipeline_kwargs(args: argparse.Namespace) -> PipelineKwargs:
    """``load_pipeline``'s keyword arguments from the ``add_model_args`` flags (the model name aside)."""
    quantization: Quantization = "8bit" if args.load_8bit else "4bit" if args.load_4bit else None
    return PipelineKwargs(
        device=args.device,
        dtype=args.dtype,
        quantization=quantization,
        device_map=args.device_map,
        weights=args.weights,
        lm=args.lm,
        vision=args.vision,
        diffusion=args.diffusion,
        decision_model=args.decision_model,
    )


def load_from_args(args: argparse.Namespace, *, load_diffusion_pipeline: bool = True) -> Pipeline:
    """The pipeline the ``add_model_args`` flags name."""
    return load_pipeline(args.model, **pipeline_kwargs(args), load_diffusion_pipeline=load_diffusion_pipeline)


def load_app(args: argparse.Namespace) -> tuple[Pipeline, AppOptions]:
    """The model, its indexes and MAGIC's CLIP as the flags name them; ``HubUnavailableError`` when the weights are
    neither on disk nor reachable, ``ValueError`` / ``OSError`` naming the flag to fix."""
    pipeline = load_from_args(args)
    indexes = load_indexes(args.index, pipeline)
    if getattr(args, "clip", None):
        attach_clip_from_args(pipeline, args.clip)
    return pipeline, AppOptions(
        max_queue=args.max_queue,
        concurrency=args.concurrency,
        kv_cache_gb=getattr(args, "kv_cache_gb", 1.0),
        indexes=indexes or None,
        db_url=getattr(args, "db_url", None) or default_db_url(),
    )


def load_indexes(specs: list[str] | None, pipeline: Pipeline) -> dict[str, ImageIndex]:
    """``--index`` values (``DIR`` or ``NAME=DIR``) -> {name: ImageIndex}; with none, the tiny presets' shipped
    index."""
    from ..retrieve.index import ImageIndex, shipped_index_dir  # when used: the CLI's parser imports this module

    fingerprint = pipeline.model.retrieval_fingerprint()
    if not specs:
        shipped = shipped_index_dir(pipeline.config.name)
        if pipeline.index is None and shipped is not None:
            return {"assets": ImageIndex.load(shipped, expected_fingerprint=fingerprint)}
        return {}
    out: dict[str, ImageIndex] = {}
    for spec in specs:
        name, _, directory = spec.rpartition("=")
        name = name or Path(directory).name
        out[name] = ImageIndex.load(directory, expected_fingerprint=fingerprint)
    return out


def attach_clip_from_args(pipeline: Pipeline, source: str) -> None:
    """``--clip``: the full CLIP that 'magic' decoding scores with; unreachable weights name the flag, not the model."""
    from ..hub import HubUnavailableError
    from ..magic import attach_clip

    try:
        attach_clip(pipeline, source)
    except HubUnavailableError as e:
        raise ValueError(f"--clip {source}: {e}") from e
