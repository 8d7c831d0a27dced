"""``EngineBackend``: the ``ChatBackend`` over ``generate.engine.Engine``: every client's turn decodes in one batch.

Per request: its pictures are decoded under the server-wide ``ImageBudget`` (``OverCapacity`` past it becomes
``Overloaded`` 429), the conversation is rebuilt as an ``EngineChat`` (history only: the KV of its prefix lives in
the engine's byte-bounded prefix cache, shared by all conversations) and its turn is submitted to the engine. Nothing
outlives the request but those caches.

A request the engine cannot serve (a MAGIC or contrastive ``decoding``: they score candidates on a cache of their
own) is handed to a ``ThreadedChatBackend`` on the same model, made at its first such request: one turn at a time,
beside the batch, so the rest of the server keeps batching.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..generate.capacity import ImageBudget, OverCapacity
from ..generate.engine import Engine, EngineRequest, GiB
from ..generate.engine_chat import EngineChat
from ..generate.events import Notice, TurnEnd
from ..generate.prompt import ImageSegment, Turn
from ..retrieve.fetch import FetchConfig, ImageFetcher
from .backend import (
    BackendLoad,
    ChatRequest,
    Failed,
    ImageInput,
    IndexViews,
    Overloaded,
    Served,
    StreamEvent,
    ThreadedChatBackend,
    Usage,
    process_id,
)

if TYPE_CHECKING:
    from ..pipeline import Pipeline


class EngineBackend:
    """``ChatBackend`` with continuous batching. ``max_batch`` turns decode together; ``max_queue`` more wait (429
    past that). ``kv_cache_gb``: the prefix cache's bound; ``image_budget_gb``: image decoding at once, server-wide,
    a request waiting up to ``image_wait_s`` for room before its 429. Requests with another ``decoding`` than
    "default" go to ``fallback`` (made on first use: a ``ThreadedChatBackend``, one turn at a time)."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        indexes: Mapping[str, object] | None = None,
        max_batch: int = 16,
        max_queue: int = 64,
        kv_cache_gb: float = 1.0,
        image_budget_gb: float = 1.0,
        image_wait_s: float = 10.0,
        image_workers: int | None = None,
        fetch: FetchConfig | None = None,
        replica: str | None = None,
        engine: Engine | None = None,
        fallback: ThreadedChatBackend | None = None,
    ):
        if max_queue < 0 or kv_cache_gb < 0 or not image_budget_gb > 0 or image_wait_s < 0:
            raise ValueError(
                f"max_queue and kv_cache_gb must be >= 0, image_budget_gb > 0 and image_wait_s >= 0; got {max_queue}, "
                f"{kv_cache_gb}, {image_budget_gb}, {image_wait_s}"
            )
        self.config = pipeline.config
        self._views = IndexViews(pipeline, indexes)
        self._pipeline = pipeline
        self.indexes = self._views.names
        self.engine = engine or Engine(
            pipeline, max_batch=max_batch, kv_cache_bytes=int(kv_cache_gb * GiB), image_workers=image_workers
        )
        self.capacity = self.engine.max_batch + max_queue
        self.image_budget = ImageBudget(max(int(image_budget_gb * GiB), 1))
        self.image_wait_s = image_wait_s
        # Pictures are decoded on one thread of their own: decoded in each request's thread, every thread's malloc
        # arena kept what its 8000 x 8000 picture had used (measured: +1.5 GB of RSS for the attachment abuse in
        # docs/serving.md, against +0.5 GB decoded on one thread), whatever the budget admitted at once.
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")
        # A request's setup (its pictures waiting for the budget and decoded, its prompt laid out) runs on a pool of
        # its own, one worker per place: on asyncio's shared default pool (6 threads on 2 cores) eight requests
        # waiting for image budget held every thread, and a text request's parsing waited 36 s behind them.
        self._setup = ThreadPoolExecutor(self.capacity, thread_name_prefix="engine-setup")
        self.replica = replica or process_id()
        self.fetcher = ImageFetcher(fetch) if fetch is not None else None
        self._fetch, self._indexes = fetch, indexes
        self.fallback = fallback
        self._lock = threading.Lock()
        self._inflight = 0
        self._closed = False

    def load(self) -> BackendLoad:
        s = self.engine.stats()
        return BackendLoad(s.active + s.parked, s.waiting, self.capacity)

    def pipeline_for(self, index: str | None) -> Pipeline:
        return self._views.get(index)

    def decode_turns(self, request: ChatRequest) -> list[Turn]:
        """``request.decode_turns`` with each data-URL picture decoded under the image budget (a URL's fetch has its
        own size limits). Raises ``ImageError`` (400) or ``Overloaded`` (429)."""
        turns = []
        for m in request.messages:
            segments: list = []
            for p in m.parts:
                if isinstance(p, ImageInput) and p.data is not None:
                    try:
                        with self.image_budget.admit(p.data, name=p.name, timeout=self.image_wait_s):
                            # decoded and kept small inside the reservation
                            image = self._decoder.submit(p.load, self.fetcher).result()
                    except OverCapacity as e:
                        raise Overloaded(str(e), status=429, retry_after_s=e.retry_after_s) from None
                    segments.append(ImageSegment(image))
                elif isinstance(p, ImageInput):
                    segments.append(ImageSegment(p.load(self.fetcher)))
                elif p:
                    segments.append(p)
            turns.append(Turn(m.role, segments, m.tokens))
        if not any(isinstance(s, ImageSegment) or s.strip() for s in turns[-1].segments):
            raise ValueError("the last user message is empty: send text or an image")
        return turns

    def fallback_backend(self) -> ThreadedChatBackend:
        """The backend of the decodings the engine does not serve, made on first use."""
        with self._lock:
            if self.fallback is None:
                self.fallback = ThreadedChatBackend(
                    self._pipeline,
                    indexes=self._indexes,
                    concurrency=1,
                    max_queue=max(self.capacity - 1, 0),
                    fetch=self._fetch,
                    replica=self.replica,
                )
            return self.fallback

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        if request.settings.decoding != "default":
            async for ev in self.fallback_backend().stream(request):
                yield ev
            return
        with self._lock:
            if self._closed:
                raise Overloaded("the server is shutting down", status=503)
            if self._inflight >= self.capacity:
                raise Overloaded(
                    f"the server is full: {self._inflight} requests are decoding or waiting (at most "
                    f"{self.capacity}); retry shortly",
                    status=429,
                )
            self._inflight += 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        released = threading.Event()
        cancelled = threading.Event()

        def release() -> None:  # the request's place, given back once: when its turn ends or it fails
            if not released.is_set():
                released.set()
                with self._lock:
                    self._inflight -= 1

        def deliver(item) -> None:  # from the engine's threads: straight onto this request's event loop
            if isinstance(item, BaseException):
                item = Failed(item)
            if isinstance(item, TurnEnd | Failed):
                release()
            with contextlib.suppress(RuntimeError):  # the stream's event loop is gone: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def start() -> tuple[list[Notice], EngineRequest] | None:
            try:
                turns = self.decode_turns(request)  # pictures decoded under the budget, off the event loop
                chat = EngineChat(self.engine, self.pipeline_for(request.index))
                chat.history = turns[:-1]
                if cancelled.is_set():  # the client left while its pictures were decoded
                    release()
                    return None
                started = chat.submit(turns[-1].segments, request.settings, listener=deliver)
            except BaseException:
                release()
                raise
            if cancelled.is_set():
                started[1].cancel()
            return started

        try:
            started = await loop.run_in_executor(self._setup, start)
        except BaseException:
            cancelled.set()
            raise
        assert started is not None, "only a cancelled stream starts nothing"
        notices, submitted = started
        try:
            yield Served(self.replica)
            for notice in notices:
                yield notice
            while True:
                item = await queue.get()
                if isinstance(item, Failed):
                    raise item.error
                if isinstance(item, TurnEnd) and submitted.result is not None:
                    r = submitted.result
                    yield Usage(r.n_prompt, tuple(r.tokens))
                yield item
                if isinstance(item, TurnEnd):
                    return
        finally:
            submitted.cancel()  # a turn the client left ends at the engine's next step (its place comes back then)

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
        await asyncio.to_thread(self.engine.close)
        if self.fallback is not None:
            await self.fallback.aclose()
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self._setup.shutdown(wait=False, cancel_futures=True)
        if self.fetcher is not None:
            self.fetcher.close()
