"""Replicas on Ray Serve: N ``ChatReplica`` deployments (each loads the model and runs a backend; one GPU each where
there are GPUs) behind one ``Ingress`` deployment that serves the same OpenAI-compatible API as ``fromage-gill api``.

The ingress reaches the replicas through a ``DeploymentHandle`` (``RayChatBackend``: the ``ChatBackend`` protocol
over the handle, events streamed back as they come); Ray routes each request to a replica with room and the
controller replaces a replica whose process dies. A request in flight on a dead replica fails with 503 (OpenAI
clients retry it). Imports Ray: only ``fromage-gill api --ray`` and its tests load this module.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from ..retrieve.fetch import FetchConfig
from .api import build_app
from .backend import BackendLoad, ChatRequest, Overloaded, StreamEvent, ThreadedChatBackend, process_id
from .engine_backend import EngineBackend

logger = logging.getLogger(__name__)

APP_NAME = "fromage_gill"
_UNAVAILABLE: tuple[type[BaseException], ...] = (RayActorError,)
try:  # Ray >= 2.10 also raises this when a replica is unreachable for a moment (restarting, network)
    from ray.exceptions import ActorUnavailableError

    _UNAVAILABLE += (ActorUnavailableError,)
except ImportError:  # pragma: no cover
    pass


@dataclass(frozen=True)
class ReplicaSpec:
    """What each replica loads and how it serves: ``load_pipeline`` arguments, ``--index`` values, the backend
    (``engine``: ``EngineBackend`` keywords, the default; None: a ``ThreadedChatBackend`` of ``concurrency``
    turns), its queue, and the URL-fetch policy."""

    model: str
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)
    index: tuple[str, ...] = ()
    concurrency: int = 1
    max_queue: int = 16
    queue_timeout_s: float = 300.0
    fetch: FetchConfig | None = FetchConfig()
    engine: Mapping[str, Any] | None = field(default_factory=dict)


@dataclass(frozen=True)
class ServeSpec:
    """The Serve application: replicas (a fixed number, or ``autoscaling`` as Ray Serve's ``autoscaling_config``:
    ``min_replicas``, ``max_replicas``, ``target_ongoing_requests``), their resources, and the ingress's options
    (``api.build_api`` keywords)."""

    replica: ReplicaSpec
    replicas: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    autoscaling: Mapping[str, Any] | None = None
    health_check_period_s: float = 2.0
    ingress_options: Mapping[str, Any] = field(default_factory=dict)


@serve.deployment
class ChatReplica:
    """One copy of the model and its backend."""

    def __init__(self, spec: ReplicaSpec):
        from ..chat.options import load_indexes
        from ..pipeline import load_pipeline

        pipeline = load_pipeline(spec.model, **spec.pipeline_kwargs)
        indexes = load_indexes(list(spec.index) or None, pipeline)
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 -- only a name for logs and headers
            replica = "replica"
        name = f"{replica}@{process_id()}"
        self.backend: ThreadedChatBackend | EngineBackend
        if spec.engine is None:
            self.backend = ThreadedChatBackend(
                pipeline,
                indexes=indexes,
                concurrency=spec.concurrency,
                max_queue=spec.max_queue,
                queue_timeout_s=spec.queue_timeout_s,
                fetch=spec.fetch,
                replica=name,
            )
        else:
            kwargs = {"max_queue": spec.max_queue, **spec.engine}
            self.backend = EngineBackend(pipeline, indexes=indexes, fetch=spec.fetch, replica=name, **kwargs)

    def info(self) -> dict:
        return {"config": self.backend.config, "indexes": self.backend.indexes, "replica": self.backend.replica}

    def load(self) -> BackendLoad:
        return self.backend.load()

    def pid(self) -> int:
        return os.getpid()

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        async for ev in self.backend.stream(request):
            yield ev


class RayChatBackend:
    """``ChatBackend`` over a handle to the ``ChatReplica`` deployment."""

    def __init__(self, handle, config, indexes: tuple[str, ...]):
        self.handle, self.config, self.indexes = handle, config, indexes
        self._running = 0

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        self._running += 1
        gen = self.handle.options(stream=True).stream.remote(request)
        try:
            async for ev in gen:
                yield ev
        except RayTaskError as e:  # the replica raised: hand on its own exception (ValueError -> 400, ...)
            cause = getattr(e, "cause", None)
            if isinstance(cause, _UNAVAILABLE):
                raise _gone(cause) from None
            raise (cause if isinstance(cause, Exception) else e) from None
        except _UNAVAILABLE as e:
            raise _gone(e) from None
        finally:
            self._running -= 1
            gen.cancel()

    def load(self) -> BackendLoad:
        return BackendLoad(self._running, 0, 0)

    async def aclose(self) -> None:
        return None


def _gone(e: BaseException) -> Overloaded:
    return Overloaded(
        f"the replica serving this request went away ({type(e).__name__}); retry: another replica takes it",
        status=503,
    )


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The OpenAI-compatible API in front of the replicas."""

    def __init__(self, replicas, config, indexes: tuple[str, ...], options: Mapping[str, Any]):
        self.backend = RayChatBackend(replicas, config, tuple(indexes))
        self.options = dict(options)

    def __serve_build_asgi_app__(self):
        return build_app(self.backend, **self.options)


def build_application(spec: ServeSpec, config, indexes: tuple[str, ...]):
    """The bound Serve application (``serve.run`` it); ``config``: the model's ``ModelConfig`` (for the ingress)."""
    r = spec.replica
    options: dict[str, Any] = dict(
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
        max_ongoing_requests=(r.concurrency if r.engine is None else r.engine.get("max_batch", 16)) + r.max_queue,
        health_check_period_s=spec.health_check_period_s,
        health_check_timeout_s=max(10.0, 5 * spec.health_check_period_s),
    )
    if spec.autoscaling:
        options["autoscaling_config"] = dict(spec.autoscaling)
    else:
        options["num_replicas"] = spec.replicas
    # serve.deployment turns the class into a Deployment; Ray's annotations say it returns a function
    replicas = ChatReplica.options(**options).bind(r)  # pyright: ignore[reportFunctionMemberAccess]
    return Ingress.bind(replicas, config, tuple(indexes), dict(spec.ingress_options))


def index_names(specs: tuple[str, ...], model: str) -> tuple[str, ...]:
    """The names ``chat.options.load_indexes`` gives ``--index`` values (without loading them)."""
    from ..retrieve.index import shipped_index_dir

    if not specs:
        return ("assets",) if shipped_index_dir(model) is not None else ()
    return tuple(s.rpartition("=")[0] or os.path.basename(s.rpartition("=")[2].rstrip("/")) for s in specs)


def run(spec: ServeSpec, *, host: str, port: int, address: str | None = None, blocking: bool = True) -> None:
    """Start (or join, ``address``) a Ray cluster, deploy the application on ``host:port``, and serve."""
    from ..pipeline import resolve_config

    config = resolve_config(spec.replica.model)
    if spec.replica.pipeline_kwargs.get("decision_model") is False:
        config = dataclasses.replace(config, decision_head=False)
    indexes = index_names(spec.replica.index, config.name)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(spec, config, indexes), name=APP_NAME, route_prefix="/", blocking=blocking)
