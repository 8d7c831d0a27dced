"""``fromage-gill api``: the OpenAI-compatible API (``serve/api.py``) over the model, on uvicorn, or over N Ray Serve
replicas with ``--ray`` (docs/serving.md)."""

from __future__ import annotations

import argparse
import logging
import os

from .common import add_model_args, pipeline_kwargs

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "api",
        help="an OpenAI-compatible chat-completions API (images in and out)",
        description="Serve /v1/chat/completions and /v1/models (docs/serving.md).",
    )
    add_model_args(p, default=os.environ.get("FROMAGE_GILL_MODEL"))
    p.add_argument("--index", action="append", metavar="[NAME=]DIR", help="image index to retrieve from (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("FROMAGE_GILL_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $FROMAGE_GILL_API_KEY; none: no key needed)",
    )
    e = p.add_argument_group("the batching engine (default; docs/serving.md)")
    e.add_argument("--max-batch", type=int, default=16, help="turns decoded together per model copy (default 16)")
    e.add_argument("--kv-cache-gb", type=float, default=1.0, help="prefix cache of conversations' KV, GB (default 1)")
    e.add_argument(
        "--image-budget-gb", type=float, default=1.0, help="memory for decoding attached pictures at once, GB (1)"
    )
    e.add_argument(
        "--image-workers",
        type=int,
        default=None,
        help="answers' pictures retrieved or generated at once (default: --max-batch; waiting diffusions run batched)",
    )
    e.add_argument(
        "--no-engine",
        action="store_true",
        help="no batching: one Chat per request, --concurrency at a time (MAGIC / contrastive requests always are)",
    )
    p.add_argument("--concurrency", type=int, default=1, help="with --no-engine: turns at once per model copy (1)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 429 (default 16)")
    p.add_argument("--queue-timeout", type=float, default=300.0, help="seconds a request may wait before a 503")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body in MB (default 64)")
    p.add_argument("--file-store-mb", type=float, default=256.0, help="memory for answers' image files (256)")
    p.add_argument("--no-fetch", action="store_true", help="refuse http(s) image URLs (data URLs only)")
    p.add_argument(
        "--fetch-private",
        action="store_true",
        help="let image URLs reach private and loopback addresses (an intranet image server); off by default",
    )
    r = p.add_argument_group("Ray Serve (pip install '.[serve]')")
    r.add_argument("--ray", action="store_true", help="serve from Ray Serve replicas behind one ingress")
    r.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    r.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX replicas instead")
    r.add_argument("--target-ongoing", type=float, default=2.0, help="autoscaling: requests per replica (2)")
    r.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (default: 1 if CUDA, else 0)")
    r.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    r.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.model:
        raise ValueError("--model is required (or set $FROMAGE_GILL_MODEL), e.g. --model toy-gill")
    from ..retrieve.fetch import FetchConfig

    engine = None if args.no_engine else engine_kwargs(args)  # a bad flag is named before the model loads
    fetch = None if args.no_fetch else FetchConfig(allow_private=args.fetch_private)
    ingress = dict(
        api_key=args.api_key or None,
        fetch_urls=fetch is not None,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
    )
    if args.ray:
        return _run_ray(args, fetch, ingress, engine)
    import uvicorn

    from ..serve.api import build_app
    from ..serve.backend import ThreadedChatBackend
    from ..serve.engine_backend import EngineBackend
    from ..serve.files import FileStore
    from .common import load_from_args

    pipeline = load_from_args(args)
    from ..chat.options import load_indexes

    indexes = load_indexes(args.index, pipeline)
    if args.no_engine:
        backend = ThreadedChatBackend(
            pipeline,
            indexes=indexes,
            concurrency=args.concurrency,
            max_queue=args.max_queue,
            queue_timeout_s=args.queue_timeout,
            fetch=fetch,
        )
    else:
        backend = EngineBackend(pipeline, indexes=indexes, fetch=fetch, **(engine or {}))
    app = build_app(backend, store=FileStore(int(args.file_store_mb * 1024 * 1024)), **ingress)
    logger.info("serving %s at http://%s:%d/v1", pipeline.config.name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def engine_kwargs(args: argparse.Namespace) -> dict:
    """``EngineBackend`` keywords from the flags, each checked here so a bad one names its flag."""
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.kv_cache_gb < 0:
        raise ValueError(f"--kv-cache-gb must be >= 0 (0: no prefix cache), got {args.kv_cache_gb}")
    if not args.image_budget_gb > 0:
        raise ValueError(f"--image-budget-gb must be > 0, got {args.image_budget_gb}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.image_workers is not None and args.image_workers < 1:
        raise ValueError(f"--image-workers must be >= 1, got {args.image_workers}")
    return dict(
        image_workers=args.image_workers,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        kv_cache_gb=args.kv_cache_gb,
        image_budget_gb=args.image_budget_gb,
    )


def _run_ray(args: argparse.Namespace, fetch, ingress: dict, engine: dict | None) -> int:
    try:
        from ..serve.ray_app import ReplicaSpec, ServeSpec, run
    except ImportError as e:
        raise ValueError(f"--ray needs Ray Serve: pip install '.[serve]' ({e})") from None
    import torch

    autoscaling = None
    if args.autoscale:
        lo, _, hi = args.autoscale.partition(":")
        if not (lo.isdigit() and hi.isdigit() and 0 <= int(lo) <= int(hi) and int(hi) >= 1):
            raise ValueError(f"--autoscale {args.autoscale!r}: expected MIN:MAX replicas, e.g. 1:4")
        autoscaling = {
            "min_replicas": int(lo),
            "max_replicas": int(hi),
            "target_ongoing_requests": args.target_ongoing,
        }
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    spec = ServeSpec(
        replica=ReplicaSpec(
            model=args.model,
            pipeline_kwargs=pipeline_kwargs(args),
            index=tuple(args.index or ()),
            concurrency=args.concurrency,
            max_queue=args.max_queue,
            queue_timeout_s=args.queue_timeout,
            fetch=fetch,
            engine=engine,
        ),
        replicas=args.replicas,
        num_gpus=args.num_gpus if args.num_gpus is not None else float(torch.cuda.is_available()),
        num_cpus=args.num_cpus,
        autoscaling=autoscaling,
        ingress_options=ingress,
    )
    logger.info("serving %s on Ray Serve at http://%s:%d/v1", args.model, args.host, args.port)
    run(spec, host=args.host, port=args.port, address=args.ray_address, blocking=True)
    return 0
