"""``EngineChat``: a ``Chat`` whose turns decode on a shared ``Engine`` (batched with every other conversation's).

It keeps what a ``Chat`` keeps (history, validation, the prompt plan that leaves out the oldest exchanges) but no KV
cache of its own: the engine's ``PrefixCache`` holds the conversation's, bounded in bytes with every other one, and
the engine's ``VisionCache`` its images' features. So an app session (or a stateless API request rebuilt from its
messages) holds its history only, and turn 30 still prefills only its new tokens while the prefix stays cached.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING

from PIL import Image

from ..settings import GenerationSettings
from .chat import Chat
from .engine import Engine, EngineRequest, TurnResult
from .events import Event, Notice, TurnEnd
from .prompt import ImageSegment, Prompt, Turn

if TYPE_CHECKING:  # types only: the pipeline module imports the whole package
    from ..config import DialogueSpec
    from ..pipeline import Pipeline


class EngineChat(Chat):
    """A ``Chat`` (same methods, same events) decoded by ``engine``. ``pipeline``: a view of the engine's pipeline
    with another index (default: the engine's own). ``last_result`` is the last finished turn's ``TurnResult``
    (its prompt size and how much of it the prefix cache served). A turn with another decoding strategy than
    "default" (MAGIC, contrastive: they score candidates on a cache of their own, which a batch row has not) decodes
    as a plain ``Chat``'s turn, in the caller's thread beside the engine's batch, and its KV is dropped when it ends
    (the next engine turn prefills what the prefix cache does not hold)."""

    def __init__(self, engine: Engine, pipeline: Pipeline | None = None, *, dialogue: DialogueSpec | None = None):
        super().__init__(pipeline or engine.pipeline, dialogue=dialogue)
        self.engine = engine
        self.vision_cache = engine.vision_cache
        self.last_result: TurnResult | None = None

    def _turn(
        self,
        prompt: Prompt,
        first: int,
        settings: GenerationSettings,
        *,
        add: Turn | None = None,
        drop_last: bool = False,
    ) -> Generator[Event, None, None]:
        if settings.decoding != "default":
            try:
                yield from super()._turn(prompt, first, settings, add=add, drop_last=drop_last)
            finally:
                self._cache, self._cache_keys = None, []  # nothing of the plain turn outlives it
            return
        rollback = self._enter_turn(add, drop_last)
        request, recorded = None, False
        try:
            notices = self._turn_notices(first, settings)
            request = self.engine.submit(
                prompt,
                settings,
                exclude=self._shown(),
                stop_strings=self.dialogue.stop_strings,
                stop_event=self.stop_requested,
                pipeline=self.pipeline,
            )
            self._first = first
            yield from notices
            for ev in request.events():
                if isinstance(ev, TurnEnd):  # the answer is in the history by the time TurnEnd is seen
                    self._record_result(request)
                    recorded = True
                yield ev
        except GeneratorExit:
            if request is None:
                rollback()
            elif not recorded:  # the consumer went away mid-turn: keep the answer so far
                if request.result is None:
                    request.cancel()
                    for _ in request.events():  # to its TurnEnd("stopped"), at the engine's next step
                        pass
                self._record_result(request)
            raise
        except BaseException:
            if recorded:  # failed after recording the answer
                self.history.pop()
            rollback()
            raise

    def submit(
        self,
        message: Sequence[str | Image.Image | ImageSegment | bytes],
        settings: GenerationSettings,
        *,
        listener: Callable[[Event | BaseException], None],
    ) -> tuple[list[Notice], EngineRequest]:
        """A turn for a server that holds the conversation itself (a stateless API request): ``message`` after the
        history, its events handed to ``listener`` from the engine's threads as they are made (no thread of the
        caller's waits on them). Returns the notices the turn says first, and the request (``result`` is set before
        its ``TurnEnd``). The history is left as it is. Raises ``ValueError`` for what ``send`` refuses, and for a
        ``decoding`` the engine does not serve."""
        _, prompt, first = self._prepare(message, settings)
        notices = self._turn_notices(first, settings)
        request = self.engine.submit(
            prompt,
            settings,
            exclude=self._shown(),
            stop_strings=self.dialogue.stop_strings,
            stop_event=self.stop_requested,
            pipeline=self.pipeline,
            listener=listener,
        )
        return notices, request

    def _record_result(self, request: EngineRequest) -> None:
        result = request.result
        assert result is not None
        self.last_result = result
        self.history.append(Turn("assistant", list(result.segments), tuple(result.tokens), result.seed, result.reason))
