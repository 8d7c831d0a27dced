"""The seam between the HTTP ingress and what decodes turns: ``ChatRequest`` in, a stream of events out.

The ingress (``api.py``) turns an OpenAI request into a ``ChatRequest`` (the whole conversation, since the API is
stateless: every request carries its history) and reads the answer as the events ``generate.chat.Chat`` streams
(``generate.events``), plus two of this module's own (``Served``, ``Usage``). Anything that implements
``ChatBackend`` can sit behind it:

- ``ThreadedChatBackend`` (here): one ``Chat`` per request, rebuilt from the request's messages, run in a small
  thread pool behind a bounded queue. Turns do not share forwards; it is the reference the batching engine is
  checked against.
- a continuous-batching engine (requests decoding together, a prefix KV cache) implements the same protocol;
- ``ray_app.RayChatBackend`` forwards each request to one of N Ray Serve replicas that each run a backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import threading
import uuid
from collections.abc import AsyncGenerator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from PIL import Image

from ..config import ModelConfig
from ..generate.chat import Chat
from ..generate.events import Event, TurnEnd
from ..generate.limits import check_image_counts
from ..generate.prompt import ImageSegment, Turn, kept_image
from ..images import ImageError, load_image
from ..retrieve.fetch import FetchConfig, ImageFetcher
from ..settings import GenerationSettings

if TYPE_CHECKING:
    from ..pipeline import Pipeline

logger = logging.getLogger(__name__)


def process_id() -> str:
    """``host:pid`` of the process answering: a replica's name in logs, response headers and spread checks. A
    function, not a constant: Ray may pickle a deployment class by value, constants of the driver's process included."""
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class ImageInput:
    """A picture a request carries, not decoded yet: the file's bytes (a data URL's payload) or an http(s) URL.

    Decoding waits until the request has its turn (``ChatRequest.decode_turns``), so a queue of requests holds
    compressed bytes, not decoded pixels. ``name`` says where it came from (``messages[2].content[1]``) in errors.
    """

    name: str
    data: bytes | None = None
    url: str | None = None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.url is None):
            raise ValueError(f"{self.name}: an ImageInput holds either data or a url, not both or neither")

    @property
    def nbytes(self) -> int:
        return len(self.data) if self.data is not None else 0

    def load(self, fetcher: ImageFetcher | None) -> Image.Image:
        """Decoded (``images.load_image``'s limits) and kept at ``limits.MAX_KEPT_IMAGE_PIXELS``; a URL is fetched
        under ``fetcher``'s policy. Raises ``ImageError`` (a ``ValueError``) naming the input."""
        if self.data is not None:
            return kept_image(load_image(self.data, name=self.name))
        if fetcher is None:
            raise ImageError(f"{self.name}: this server does not fetch image URLs; send the image as a data URL")
        try:
            return kept_image(fetcher.fetch_url(self.url or ""))
        except ImageError as e:
            raise ImageError(f"{self.name}: {e}") from None


@dataclass(frozen=True)
class ChatMessage:
    """One message of a request. ``parts`` in order: text, pictures not decoded yet (``ImageInput``, the user's) and
    pictures already known (``ImageSegment``: the server's own earlier answers). ``tokens``: an answer's exact
    tokens when the server still knows them (so the prompt repeats the cached positions), else None."""

    role: Literal["user", "assistant"]
    parts: tuple[str | ImageInput | ImageSegment, ...]
    tokens: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ChatRequest:
    """One stateless turn: the conversation so far (user first, alternating, the user's new message last), how to
    decode the answer, and which loaded image index to retrieve from (None: the backend's first).

    Built by the ingress, which has already refused malformed input (roles, counts, settings); a backend may be in
    another process (Ray), so everything here pickles.
    """

    messages: tuple[ChatMessage, ...]
    settings: GenerationSettings
    index: str | None = None
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")

    def __post_init__(self) -> None:
        if not self.messages:
            raise ValueError("messages is empty: send at least one user message")
        for i, m in enumerate(self.messages):
            want = "user" if i % 2 == 0 else "assistant"
            if m.role != want:
                raise ValueError(
                    f"messages[{i}] is a {m.role} message where a {want} message must be: a conversation starts "
                    f"with the user and alternates user, assistant"
                )
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's: the model answers it")
        images = 0
        for i, m in enumerate(self.messages):  # before anything is decoded, as Chat.send counts them
            n = sum(isinstance(p, (ImageInput, ImageSegment)) for p in m.parts)
            if m.role == "user":
                check_image_counts(images, n, where=f"messages[{i}]")
            images += n

    def decode_turns(self, fetcher: ImageFetcher | None = None) -> list[Turn]:
        """The messages as ``Turn``s, every ``ImageInput`` decoded and kept small, one at a time (the peak is one
        full-size picture per call). Raises ``ImageError`` naming the bad one. Backends call it once the request
        has its turn, never while it waits; running many at once needs a budget of its own (one full-size
        8000 x 8000 picture peaks at about 0.5 GB)."""
        turns = []
        for m in self.messages:
            segments: list[str | ImageSegment] = []
            for p in m.parts:
                if isinstance(p, ImageInput):
                    segments.append(ImageSegment(p.load(fetcher)))
                elif p:  # empty text adds nothing
                    segments.append(p)
            turns.append(Turn(m.role, segments, m.tokens))
        if not any(isinstance(s, ImageSegment) or s.strip() for s in turns[-1].segments):
            raise ValueError("the last user message is empty: send text or an image")
        return turns


# ---------------------------------------------------------------------------------------------- what comes back


@dataclass(frozen=True)
class Served:
    """Which replica serves the request (``process_id()`` or a Ray replica's id); a backend may yield it first."""

    replica: str


@dataclass(frozen=True)
class Usage:
    """Yielded just before ``TurnEnd``: ``tokens``, exactly the tokens the answer put in the context (the ingress
    gives them back when the client sends the answer again, so the next prompt repeats the cached positions);
    ``prompt_tokens``, the positions the prompt took (an image counts its visual tokens)."""

    prompt_tokens: int
    tokens: tuple[int, ...]

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


StreamEvent = Event | Served | Usage


class Overloaded(RuntimeError):
    """The backend cannot take the request now: ``status`` 429 (its queue is full) or 503 (it waited too long, the
    backend is closing, or a replica went away); the client may retry after ``retry_after_s``."""

    def __init__(self, message: str, *, status: int = 429, retry_after_s: float = 1.0):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class BackendLoad:
    running: int
    waiting: int
    capacity: int  # running + waiting at most; one more is refused with 429


@runtime_checkable
class ChatBackend(Protocol):
    """What the ingress needs from an engine.

    ``stream(request)`` is an async generator of ``StreamEvent``:
    - a ``Served`` first (optional), then the events of one turn as ``Chat.send`` yields them (``TextDelta``,
      ``ImagePending``, ``ImageResult``, ``Notice``, and any event type added later, which the ingress skips), then
      ``Usage``, then exactly one ``TurnEnd``, which ends the stream;
    - every error in the request (a bad image, a setting the model cannot serve, a prompt too long, an unknown
      index) is raised as ``ValueError`` before the first event of ``generate.events``, so the ingress can answer
      400 with the message; ``Overloaded`` likewise for 429 / 503;
    - it is stateless: nothing about the request outlives the stream except caches keyed by content;
    - closing the generator early (``aclose()``, or its task cancelled: the client went away) stops the turn
      within a token or a diffusion step and frees its place.
    ``config`` is the model's (its name, default settings and dialogue template: the ingress builds the request's
    ``GenerationSettings`` from them); ``indexes`` the names a request's ``index`` may take (the first is the default;
    empty: no index). ``load()`` is cheap and thread-safe; ``aclose()`` refuses new requests (503) and frees workers.
    """

    config: ModelConfig
    indexes: tuple[str, ...]

    def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]: ...

    def load(self) -> BackendLoad: ...

    async def aclose(self) -> None: ...


# ---------------------------------------------------------------------------------------------- the simple backend


class Failed:
    """An error met in a backend's worker thread, handed to the request's stream to be raised there."""

    def __init__(self, error: BaseException):
        self.error = error


DONE = object()  # the end of a worker thread's items for a request's stream


class IndexViews:
    """One ``Pipeline`` view per loaded index, sharing the model (as the app's handlers hold them); ``indexes``
    default: the pipeline's own, named "default"."""

    def __init__(self, pipeline: Pipeline, indexes: Mapping[str, object] | None):
        views = dict(indexes or {})
        if not views and pipeline.index is not None:
            views = {"default": pipeline.index}
        self._views = {name: dataclasses.replace(pipeline, index=idx) for name, idx in views.items()}
        self._pipeline = pipeline
        self.names = tuple(self._views)

    def get(self, index: str | None) -> Pipeline:
        """The view of ``index`` (None: the first, or the pipeline itself without an index), or a ValueError naming
        the loaded ones."""
        if index is None:
            return next(iter(self._views.values()), self._pipeline)
        if index not in self._views:
            have = ", ".join(self.names) or "none (the server was started without --index)"
            raise ValueError(f"index {index!r} is not loaded; this server has: {have}")
        return self._views[index]


class ThreadedChatBackend:
    """One ``Chat`` per request, rebuilt from its messages, in a pool of ``concurrency`` threads (the turns in it
    share the model, not their forwards); at most ``max_queue`` more wait (429 past that; 503 after waiting
    ``queue_timeout_s``). Pictures are decoded on a line of their own, one at a time and by at most
    ``concurrency + 1`` requests at once (each then keeps at most 8 pictures of 2 megapixels), so a queue of
    requests holds compressed bytes, and text turns do not wait behind another request's decoding."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        indexes: Mapping[str, object] | None = None,
        concurrency: int = 1,
        max_queue: int = 16,
        queue_timeout_s: float = 300.0,
        fetch: FetchConfig | None = None,
        replica: str | None = None,
    ):
        if concurrency < 1 or max_queue < 0 or not queue_timeout_s > 0:
            raise ValueError(
                f"concurrency must be >= 1, max_queue >= 0 and queue_timeout_s > 0; got {concurrency}, "
                f"{max_queue}, {queue_timeout_s}"
            )
        self.config = pipeline.config
        self._views = IndexViews(pipeline, indexes)
        self.indexes = self._views.names
        self.concurrency, self.max_queue, self.queue_timeout_s = concurrency, max_queue, queue_timeout_s
        self.replica = replica or process_id()
        self.fetcher = ImageFetcher(fetch) if fetch is not None else None
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="chat")
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")  # one full-size picture at a time
        self._image_slots = asyncio.Semaphore(concurrency + 1)
        self._lock = threading.Lock()
        self._inflight = 0
        self._running = 0
        self._closed = False

    def load(self) -> BackendLoad:
        with self._lock:
            return BackendLoad(self._running, self._inflight - self._running, self.concurrency + self.max_queue)

    def pipeline_for(self, index: str | None) -> Pipeline:
        return self._views.get(index)

    def _admit(self) -> None:
        """Take a place in the queue, or refuse: 503 while shutting down, 429 when it is full."""
        with self._lock:
            if self._closed:
                raise Overloaded("the server is shutting down", status=503)
            if self._inflight >= self.concurrency + self.max_queue:
                raise Overloaded(
                    f"the queue is full: {self._inflight} requests are running or waiting (at most "
                    f"{self.concurrency} running and {self.max_queue} waiting); retry shortly",
                    status=429,
                )
            self._inflight += 1

    def _busy(self) -> Overloaded:
        return Overloaded(
            f"waited {self.queue_timeout_s:g} s in the queue without a turn; the server is busy, retry later",
            status=503,
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        self._admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled, started = threading.Event(), threading.Event()
        chats: list[Chat] = []

        def emit(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work(turns: list[Turn]) -> None:
            with self._lock:
                self._running += 1
            started.set()
            try:
                if not cancelled.is_set():
                    self._run(request, turns, emit, cancelled, chats)
            except BaseException as e:  # noqa: BLE001 -- handed to the request's own stream, raised there
                emit(Failed(e))
            finally:
                with self._lock:
                    self._running -= 1
                    self._inflight -= 1
                emit(DONE)

        future = None
        deadline = loop.time() + self.queue_timeout_s
        has_images = any(isinstance(p, ImageInput) for m in request.messages for p in m.parts)
        try:
            yield Served(self.replica)
            # Pictures are decoded on a line of their own, one at a time, by at most concurrency + 1 requests at
            # once (what they keep stays bounded), so text turns never wait behind another request's decoding
            if has_images:
                try:
                    await asyncio.wait_for(self._image_slots.acquire(), deadline - loop.time())
                except asyncio.TimeoutError:
                    raise self._busy() from None
            try:
                if has_images:
                    decoding = loop.run_in_executor(self._decoder, request.decode_turns, self.fetcher)
                    turns = await asyncio.wait_for(decoding, max(deadline - loop.time(), 1.0))
                else:
                    turns = request.decode_turns()
                future = self._pool.submit(work, turns)
                while True:
                    try:
                        timeout = None if started.is_set() else deadline - loop.time()
                        item = await asyncio.wait_for(queue.get(), timeout)
                    except asyncio.TimeoutError:
                        if started.is_set():
                            continue
                        raise self._busy() from None
                    if item is DONE:
                        return
                    if isinstance(item, Failed):
                        raise item.error
                    yield item
            finally:
                if has_images:
                    self._image_slots.release()
        finally:
            cancelled.set()
            for chat in chats:
                chat.stop()
            if future is None or future.cancel():  # never started: its place is given back here
                with self._lock:
                    self._inflight -= 1

    def _run(self, request: ChatRequest, turns: list[Turn], emit, cancelled: threading.Event, chats: list) -> None:
        pipeline = self.pipeline_for(request.index)
        chat = Chat(pipeline)
        chat.history = turns[:-1]
        chats.append(chat)
        for ev in chat.send(turns[-1].segments, request.settings):
            if cancelled.is_set():
                chat.stop()
            if isinstance(ev, TurnEnd):  # the answer is in the history by now, with its exact tokens
                tokens = tuple(chat.history[-1].tokens or ())
                emit(Usage(max(chat.cached_tokens - len(tokens), 0), tokens))
            emit(ev)

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._decoder.shutdown(wait=False, cancel_futures=True)
        if self.fetcher is not None:
            self.fetcher.close()
