"""The OpenAI-compatible HTTP API (FastAPI) over any ``ChatBackend``: ``/v1/models``, ``/v1/chat/completions``
(server-sent events when ``stream``), ``/v1/files/<id>.png`` (the images answers link to) and ``/health``.

``build_api`` makes the ``/v1`` application (mounted by ``build_app`` for ``fromage-gill api``, and by the chat app
under ``--api`` into gradio's own server); every error is OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}`` with its status: 400 bad input, 401 a missing or wrong key, 413 a body over the limit, 429 the queue is
full, 503 waited too long / shutting down / a replica went away, 500 the model failed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pydantic
from fastapi import Depends, FastAPI, Request, params
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..generate.events import ImageResult, Notice, TextDelta, TurnEnd
from .backend import ChatBackend, Overloaded, Served, StreamEvent, Usage
from .convert import Answer, BadRequest, to_chat_request
from .files import AnswerMemo, FileStore
from .schemas import ChatCompletionRequest

if TYPE_CHECKING:
    from ..chat.options import AppOptions
    from ..generate.engine import Engine
    from ..pipeline import Pipeline

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-fromage-gill-replica"
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # eight images of several MB as base64, with room; more is refused with 413


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers: dict[str, str] = {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def api_error(e: BaseException) -> APIError:
    """The status and OpenAI error body for an exception raised while serving a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, Overloaded):
        err = APIError(
            e.status,
            str(e),
            type="rate_limit_error" if e.status == 429 else "server_error",
            code="queue_full" if e.status == 429 else "overloaded",
        )
        err.headers["retry-after"] = str(max(1, round(e.retry_after_s)))
        return err
    if isinstance(e, ValueError):  # the engine's refusals: bad image, settings it cannot serve, too long
        message = str(e)
        code = getattr(e, "code", None) or ("context_length_exceeded" if "but the LM fits" in message else None)
        return APIError(400, message, type="invalid_request_error", param=getattr(e, "param", None), code=code)
    logger.exception("request failed", exc_info=e)
    return APIError(500, f"the model failed on this request: {type(e).__name__}: {e}", type="server_error")


def build_api(
    backend: ChatBackend,
    *,
    api_key: str | None = None,
    fetch_urls: bool = True,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    store: FileStore | None = None,
    memo: AnswerMemo | None = None,
) -> FastAPI:
    """The ``/v1`` application (its routes are relative: mount it at ``/v1``)."""
    store = store or FileStore()
    memo = memo or AnswerMemo()
    api = FastAPI(title="fromage_gill", openapi_url=None, docs_url=None, redoc_url=None)

    @api.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    authorized = Depends(_authorizer(api_key))
    _info_routes(api, backend, store, authorized)
    _chat_route(api, backend, store, memo, authorized, fetch_urls=fetch_urls, max_request_bytes=max_request_bytes)
    return api


def _authorizer(api_key: str | None) -> Callable[[Request], None]:
    """The dependency that checks a request's ``Authorization: Bearer`` key (none when ``api_key`` is None)."""

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            what = "no API key was sent" if not given else "the API key is wrong"
            raise APIError(
                401,
                f"{what}: send 'Authorization: Bearer <key>' with the key the server was started with (--api-key)",
                type="invalid_request_error",
                code="invalid_api_key",
            )

    return authorized


def _info_routes(api: FastAPI, backend: ChatBackend, store: FileStore, authorized: params.Depends) -> None:
    """``/models``, ``/models/{id}``, the answers' image files and ``/health``."""
    config = backend.config

    def model_entry() -> dict:
        return {
            "id": config.name,
            "object": "model",
            "created": 0,
            "owned_by": "fromage_gill",
            "fromage_gill": {"kind": config.kind, "indexes": list(backend.indexes)},
        }

    @api.get("/models", dependencies=[authorized])
    async def models() -> dict:
        return {"object": "list", "data": [model_entry()]}

    @api.get("/models/{model_id}", dependencies=[authorized])
    async def model(model_id: str) -> dict:
        if model_id != config.name:
            raise APIError(
                404,
                f"no model {model_id!r}: this server serves {config.name!r}",
                type="invalid_request_error",
                code="model_not_found",
            )
        return model_entry()

    @api.get("/files/{file_id}.png", name="file")
    async def file(file_id: str) -> Response:
        stored = store.get(file_id) if re.fullmatch(r"[0-9a-f]{32}", file_id) else None
        if stored is None:
            raise APIError(
                404,
                f"no file {file_id}.png: it expired from the server's store (the answer's message.images holds it)",
                type="invalid_request_error",
                code="file_not_found",
            )
        return Response(stored.png, media_type="image/png", headers={"cache-control": "private, max-age=86400"})

    @api.get("/health")
    async def health() -> dict:
        load = backend.load()
        out: dict = {"model": config.name, "running": load.running, "waiting": load.waiting, "capacity": load.capacity}
        engine = getattr(backend, "engine", None)  # a batching backend: how much its forwards were shared
        if engine is not None:
            s = engine.stats()
            out["engine"] = {"steps": s.steps, "tokens": s.tokens, "largest_batch": s.largest_batch}
        return out


def _chat_route(
    api: FastAPI,
    backend: ChatBackend,
    store: FileStore,
    memo: AnswerMemo,
    authorized: params.Depends,
    *,
    fetch_urls: bool,
    max_request_bytes: int,
) -> None:
    """``/chat/completions``, streamed (server-sent events) or not."""
    config = backend.config

    @api.post("/chat/completions", dependencies=[authorized])
    async def chat_completions(request: Request) -> Response:
        body = await _read_body(request, max_request_bytes)
        req, chat_request = await asyncio.to_thread(_parse, body, config, memo, store, fetch_urls)
        events = backend.stream(chat_request)
        try:
            replica, first = await _first_event(events)
        except BaseException as e:
            await events.aclose()
            if isinstance(e, Exception):
                raise api_error(e) from None
            raise
        headers = {REPLICA_HEADER: replica}
        answer = Answer()

        def file_url(file_id: str) -> str:
            return str(request.url_for("file", file_id=file_id))

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunks = _sse(
                chat_request.id, config.name, replica, first, events, answer, store, memo, file_url, include_usage
            )
            return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
        try:
            async for ev in _chain(first, events):
                await _apply(ev, answer, store, file_url)
        except Exception as e:
            raise api_error(e) from None
        finally:
            await events.aclose()
        answer.remember(memo, answer.usage.tokens if answer.usage else None)
        message: dict = {"role": "assistant", "content": answer.content}
        if answer.images:
            message["images"] = answer.images
        body = {
            "id": chat_request.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": config.name,
            "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason or "stop"}],
            "usage": answer.usage_dict(),
            "fromage_gill": {"replica": replica, "seed": answer.seed, "notices": answer.notices},
        }
        return JSONResponse(body, headers=headers)


def build_app(backend: ChatBackend, **kwargs) -> FastAPI:
    """``fromage-gill api``'s whole application: ``build_api`` at ``/v1``; the backend is closed at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await backend.aclose()

    app = FastAPI(title="fromage_gill", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.mount("/v1", build_api(backend, **kwargs))
    return app


# ---------------------------------------------------------------------------------------------- internals


async def _read_body(request: Request, limit: int) -> bytes:
    def too_big() -> APIError:
        return APIError(
            413,
            f"the request body is more than {limit:,} bytes; send fewer or smaller images",
            type="invalid_request_error",
            code="request_too_large",
        )

    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > limit:
        raise too_big()
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_big()
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes, config, memo: AnswerMemo, store: FileStore, fetch_urls: bool):
    """(the validated request, the engine's ``ChatRequest``); ``APIError`` 400 naming the field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", type="invalid_request_error") from None
    try:
        req = ChatCompletionRequest.model_validate(data)
    except pydantic.ValidationError as e:
        raise _validation_error(e) from None
    if req.model != config.name:
        raise APIError(
            400,
            f"model {req.model!r} is not served here; this server serves {config.name!r} (GET /v1/models)",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )
    try:
        return req, to_chat_request(req, config, memo=memo, store=store, fetch_urls=fetch_urls)
    except BadRequest as e:
        raise APIError(400, str(e), type="invalid_request_error", param=e.param, code=e.code) from None
    except ValueError as e:
        raise APIError(400, str(e), type="invalid_request_error", param="messages") from None


def _validation_error(e: pydantic.ValidationError) -> APIError:
    # pydantic reports every branch of a union; the deepest location is the one the client got wrong
    err = max(e.errors(), key=lambda x: len(x["loc"]))
    loc = [p for p in err["loc"] if isinstance(p, int) or not re.search(r"[\[\-]|^(str|list|int|float)$", p)]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if err["type"] == "extra_forbidden":
        message = (
            f"unknown field {param!r}: this server takes OpenAI's chat-completion fields and its own settings "
            f"(mode, ret_scale_factor, gen_scale_factor, image_logit_bias, steps, ...; docs/serving.md)"
        )
    elif err["type"] == "missing":
        message = f"{param}: required"
    else:
        message = f"{param}: {err['msg']}" + (
            f" (got {err['input']!r})" if not isinstance(err.get("input"), (dict, list)) else ""
        )
    return APIError(400, message[:500], type="invalid_request_error", param=param, code="invalid_value")


async def _first_event(events: AsyncGenerator[StreamEvent, None]) -> tuple[str, StreamEvent]:
    """The serving replica and the first event that is not ``Served``: errors in the request come before it."""
    replica = "unknown"
    while True:
        ev = await anext(events)
        if isinstance(ev, Served):
            replica = ev.replica
            continue
        return replica, ev


async def _chain(first: StreamEvent, events: AsyncGenerator[StreamEvent, None]) -> AsyncGenerator[StreamEvent, None]:
    yield first
    if isinstance(first, TurnEnd):
        return
    async for ev in events:
        yield ev
        if isinstance(ev, TurnEnd):
            return


async def _apply(ev: StreamEvent, answer: Answer, store: FileStore, file_url) -> tuple[str, dict | None] | None:
    """Add one event to ``answer``; (content added, image entry or None) when the client sees something new."""
    if isinstance(ev, TextDelta):
        return answer.add_text(ev), None
    if isinstance(ev, ImageResult):
        link, entry = await asyncio.to_thread(answer.add_image, ev, store, file_url)
        return link, entry
    if isinstance(ev, Usage):
        answer.usage = ev
    elif isinstance(ev, Notice):
        answer.note(ev)
    elif isinstance(ev, TurnEnd):
        answer.end(ev)
    return None  # ImagePending and event types added later: nothing to show in this API


async def _sse(
    request_id: str,
    model: str,
    replica: str,
    first: StreamEvent,
    events: AsyncGenerator[StreamEvent, None],
    answer: Answer,
    store: FileStore,
    memo: AnswerMemo,
    file_url,
    include_usage: bool,
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for ev in _chain(first, events):
            shown = await _apply(ev, answer, store, file_url)
            if shown is not None and shown[0]:
                text, entry = shown
                yield chunk({"content": text, **({"images": [entry]} if entry is not None else {})})
        answer.remember(memo, answer.usage.tokens if answer.usage else None)
        tail = {"fromage_gill": {"replica": replica, "seed": answer.seed, "notices": answer.notices}}
        yield chunk({}, answer.finish_reason or "stop", **tail)
        if include_usage:
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
            yield f"data: {json.dumps({**body, 'choices': [], 'usage': answer.usage_dict()})}\n\n"
    except Exception as e:  # noqa: BLE001 -- the status line is sent: the error travels as an SSE event
        err = api_error(e)
        body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
        yield f"data: {json.dumps(body)}\n\n"
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"


def gradio_app_kwargs(
    pipeline: Pipeline, options: AppOptions, *, api_key: str | None = None, engine: Engine | None = None
) -> dict:
    """``app_kwargs`` for gradio's ``launch()`` that serve this API at ``/v1`` from the chat app's own server (same
    model, same indexes; its own queue of ``options.max_queue``), on an ``EngineBackend``: ``engine``, the app's
    sessions' own ``Engine`` (so API requests and visitors' turns decode in one batch), or a new one of
    ``options.concurrency`` rows. The key: ``api_key`` or $FROMAGE_GILL_API_KEY."""
    import os

    from starlette.routing import Mount

    from ..retrieve.fetch import FetchConfig
    from .engine_backend import EngineBackend

    backend = EngineBackend(
        pipeline,
        indexes=dict(options.indexes) if options.indexes else None,
        max_batch=options.concurrency,
        max_queue=options.max_queue,
        kv_cache_gb=options.kv_cache_gb,
        fetch=FetchConfig(),
        engine=engine,
    )
    api = build_api(backend, api_key=api_key or os.environ.get("FROMAGE_GILL_API_KEY") or None)
    return {"routes": [Mount("/v1", app=api)]}
