"""``Chat``: one conversation, its history, the vision features of its images and the KV cache of its prompt.

A turn's prompt (``prompt.py``) is compared with what the cache already holds; the LM runs only on the positions
after the longest common prefix, so turn 10 costs its new tokens, not the whole history again. Oldest exchanges are
left out (with a ``Notice``) when the conversation outgrows the LM's context.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from PIL import Image

from ..config import DialogueSpec
from ..settings import GenerationSettings
from .events import Notice, TurnEnd, TurnEvents
from .history import JSON, history_from_dict, history_to_dict
from .limits import check_image_counts, check_settings, context_length, image_paths, image_positions, too_long
from .loop import DecodeLoop, Row, fresh_seed
from .prompt import (
    ImageSegment,
    Prompt,
    Turn,
    VisionCache,
    dialogue_pieces,
    encode_pieces,
    message_items,
    normalize_message,
)
from .stream import TextStream

if TYPE_CHECKING:  # types only: the pipeline module imports the whole package
    from transformers.cache_utils import Cache

    from ..pipeline import Pipeline


class Chat:
    """One conversation: its history, the vision features of its images, and the KV cache of its prompt so far.

    ``send`` validates at once (raising before anything changes) and returns an iterator of events; the turn is
    added to the history as it runs. Use one thread per Chat; ``stop()`` may be called from any thread. A
    ``send`` or ``regenerate`` starts unstopped: a ``stop()`` after it (even before its first event) ends that turn.
    """

    def __init__(self, pipeline: Pipeline, *, dialogue: DialogueSpec | None = None):
        self.pipeline = pipeline
        self.dialogue = dialogue or pipeline.config.dialogue
        self.history: list[Turn] = []
        self.vision_cache = VisionCache()
        self._cache: Cache | None = None
        self._cache_keys: list[Hashable] = []  # what each cached position holds (see Prompt.keys)
        self._first = 0  # first history turn still in the prompt (older ones were left out to fit)
        # The one stop flag of a turn: set by stop() from any thread, read by the decode loop and the diffusion;
        # cleared when a turn starts (an app may also clear it earlier, when it queues a message for the model)
        self.stop_requested = threading.Event()
        self._active: TurnEvents | None = None
        self._told_no_images = False

    # -- public API ------------------------------------------------------------------------------------------------

    def send(
        self, message: Sequence[str | Image.Image | ImageSegment | bytes], settings: GenerationSettings | None = None
    ) -> TurnEvents:
        """Add a user message (str and images, in order) and stream the answer's events. A message holds at most
        ``limits.MAX_IMAGES_PER_MESSAGE`` images and a conversation ``MAX_IMAGES_PER_CONVERSATION``; images over
        ``prompt.MAX_KEPT_IMAGE_PIXELS`` are kept (and seen) scaled down to it."""
        settings = settings or GenerationSettings.for_model(self.pipeline.config)
        self._close_active()
        user, prompt, first = self._prepare(message, settings)
        return self._start(self._turn(prompt, first, settings, add=user))

    def _prepare(
        self, message: Sequence[str | Image.Image | ImageSegment | bytes], settings: GenerationSettings
    ) -> tuple[Turn, Prompt, int]:
        """A new message checked and laid out after the history: its turn, the prompt and its first kept turn."""
        check_settings(self.pipeline, settings)
        items = message_items(message)  # the image limits before any image is decoded
        check_image_counts(sum(len(t.images) for t in self.history), sum(not isinstance(m, str) for m in items))
        user = Turn("user", normalize_message(items))
        prompt, first = self._plan([*self.history, user], settings)
        return user, prompt, first

    def regenerate(self, settings: GenerationSettings | None = None) -> TurnEvents:
        """Run the last answer again (a new seed unless ``settings.seed`` is set)."""
        settings = settings or GenerationSettings.for_model(self.pipeline.config)
        self._close_active()
        check_settings(self.pipeline, settings)
        if not self.history or self.history[-1].role != "assistant":
            raise ValueError("nothing to regenerate: the conversation has no answer yet")
        prompt, first = self._plan(self.history[:-1], settings)
        return self._start(self._turn(prompt, first, settings, drop_last=True))

    def stop(self) -> None:
        """End the running turn at the next token (thread-safe); what streamed so far is kept."""
        self.stop_requested.set()

    def undo(self) -> list[Turn]:
        """Drop the last user + assistant exchange; returns the removed turns ([] if the chat is empty)."""
        self._close_active()
        removed: list[Turn] = []
        if self.history and self.history[-1].role == "assistant":
            removed.insert(0, self.history.pop())
        if self.history and self.history[-1].role == "user":
            removed.insert(0, self.history.pop())
        self._first = min(self._first, len(self.history))
        return removed

    def truncate(self, n_turns: int) -> None:
        """Keep the first ``n_turns`` turns (e.g. to edit a past user message and branch from there)."""
        self._close_active()
        # callers may pass anything (the app hands on a number from the page): the check is for them
        if not isinstance(n_turns, int) or not 0 <= n_turns <= len(self.history):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"n_turns must be an integer in [0, {len(self.history)}], got {n_turns!r}")
        del self.history[n_turns:]
        self._first = min(self._first, n_turns)

    def clear(self) -> None:
        self.truncate(0)

    @property
    def context_length(self) -> int:
        return context_length(self.pipeline)

    @property
    def cached_tokens(self) -> int:
        """Prompt positions held in the KV cache."""
        return len(self._cache_keys)

    # -- export / import ---------------------------------------------------------------------------------------------

    def to_dict(self) -> JSON:
        """JSON-able: text, images as PNG base64 with their metadata, and each answer's tokens, seed, end reason."""
        return history_to_dict(self.history, model=self.pipeline.config.name)

    @classmethod
    def from_dict(cls, pipeline: Pipeline, data: JSON) -> Chat:
        """Rebuild a chat from ``to_dict`` output; raises ``ValueError`` saying what is wrong."""
        chat = cls(pipeline)
        chat.history = history_from_dict(data, model=pipeline.config.name, vocab_size=pipeline.model.vocab_size)
        return chat

    # -- internals ---------------------------------------------------------------------------------------------------

    def _start(self, gen: TurnEvents) -> TurnEvents:
        self.stop_requested.clear()  # a new turn starts unstopped (here, not when it runs: a stop may come first)
        self._active = gen
        return gen

    def _close_active(self) -> None:
        gen = self._active
        if gen is not None and inspect.getgeneratorstate(gen) == inspect.GEN_RUNNING:
            raise ValueError(
                "a turn of this chat is still running in another thread: call stop() and let it end "
                "before changing the conversation"
            )
        self._active = None
        if gen is not None and inspect.getgeneratorstate(gen) == inspect.GEN_SUSPENDED:
            gen.close()  # the abandoned turn ends as "stopped", keeping what it produced

    def _encode(self, turns: Sequence[Turn], history_layout: Literal["exact", "published"] = "exact") -> Prompt:
        cfg = self.pipeline.config
        pieces = dialogue_pieces(
            turns,
            self.dialogue,
            self.pipeline.model.image_token_ids,
            layout=history_layout,
            image_tokens=cfg.image_tokens,
        )
        return encode_pieces(self.pipeline.tokenizer, pieces, self.pipeline.config.n_visual_tokens)

    def _plan(self, turns: list[Turn], settings: GenerationSettings) -> tuple[Prompt, int]:
        """The prompt for ``turns`` that fits the context, leaving out the oldest exchanges if needed."""
        budget = context_length(self.pipeline) - settings.max_new_tokens - image_positions(self.pipeline, settings)
        last = len(turns) - 1
        first = min(self._first, last)
        while first > 0 and turns[first].role != "user":
            first -= 1
        # A window of max_exchanges earlier exchanges is a choice of the model's dialogue, not a loss: only turns
        # left out to fit the context move ``first`` (and get a Notice)
        users = [i for i, t in enumerate(turns) if t.role == "user"]
        k = self.dialogue.max_exchanges
        start = max(first, users[-(k + 1)] if k is not None and len(users) > k else 0)
        prompt = self._encode(turns[start:], settings.history_layout)
        while len(prompt) > budget and start < last:
            start = first = next((i for i in range(start + 1, last + 1) if turns[i].role == "user"), last)
            prompt = self._encode(turns[start:], settings.history_layout)
        if len(prompt) > budget:
            raise too_long(self.pipeline, settings, len(prompt), "the message")
        return prompt, first

    def _turn(
        self,
        prompt: Prompt,
        first: int,
        settings: GenerationSettings,
        *,
        add: Turn | None = None,
        drop_last: bool = False,
    ) -> TurnEvents:
        rollback = self._enter_turn(add, drop_last)
        seed = settings.seed if settings.seed is not None else fresh_seed()
        loop = None
        try:
            notices = self._turn_notices(first, settings)
            self._first = first
            row = self._row(settings, prompt)
            embeds = self._prefill_embeds(prompt)
            loop = DecodeLoop(
                self.pipeline,
                settings,
                [row],
                seed=seed,
                cache=self._cache,
                n_past=len(self._cache_keys),
                stop_event=self.stop_requested,
            )
            self._cache_keys = list(prompt.keys)  # from the first forward on, the cache holds the prompt
            yield from notices
            for _, ev in loop.run(embeds, torch.ones(1, embeds.shape[1], dtype=torch.long)):
                if isinstance(ev, TurnEnd):  # the answer is in the history by the time TurnEnd is seen
                    self._record(loop, prompt)
                yield ev
        except GeneratorExit:
            if loop is None:
                rollback()
            elif loop.rows[0].reason is None:  # the consumer went away mid-turn: keep the answer so far
                loop.finish_silently(0, "stopped")
                self._record(loop, prompt)
            raise
        except BaseException:
            self._reset_cache()
            if loop is not None and loop.rows[0].reason is not None:  # failed after recording the answer
                self.history.pop()
            rollback()
            raise

    def _enter_turn(self, add: Turn | None, drop_last: bool) -> Callable[[], None]:
        """Put the turn's message in the history (``drop_last``: in place of the last turn, as a regenerate does);
        returns what undoes it, the prompt's first kept turn included, for a turn that fails."""
        removed = self.history.pop() if drop_last else None
        if add is not None:
            self.history.append(add)
        old_first = self._first

        def rollback() -> None:
            self._first = old_first
            if add is not None:
                self.history.pop()
            if removed is not None:
                self.history.append(removed)

        return rollback

    def _turn_notices(self, first: int, settings: GenerationSettings) -> list[Notice]:
        """What a turn says before its answer: turns left out of the prompt, and (once) that images are off."""
        notices = []
        if first > self._first:
            notices.append(
                Notice(
                    f"the {first} oldest turn(s) were left out of the prompt to fit the LM's "
                    f"context of {self.context_length} tokens"
                )
            )
        if settings.mode != "text" and not any(image_paths(self.pipeline, settings)) and not self._told_no_images:
            self._told_no_images = True
            notices.append(Notice("images are off: no image index is loaded and this model cannot generate them"))
        return notices

    def _row(self, settings: GenerationSettings, prompt: Prompt) -> Row:
        stops = settings.stop_strings if settings.stop_strings is not None else self.dialogue.stop_strings
        images = [s.image for s in prompt.images()]
        return Row(exclude=self._shown(), stream=TextStream(self.pipeline.tokenizer, stops), images=images)

    def _shown(self) -> set[int]:
        """The index ids of the images in the history: not to be retrieved again."""
        return {s.index_id for t in self.history for s in t.images if s.index_id is not None}

    def _prefill_embeds(self, prompt: Prompt) -> torch.Tensor:
        """Crop the cache to the prefix it shares with ``prompt``; embed the rest ((1, T_new, d))."""
        n_common = prompt.common_prefix(self._cache_keys) if self._cache is not None else 0
        n_common = min(n_common, len(prompt) - 1)  # at least one position runs, for the next-token logits
        cache = self._cache
        if n_common == 0 or cache is None:
            self._reset_cache()
        elif cache.get_seq_length() > n_common:
            cache.crop(n_common - cache.get_seq_length())
        self._cache_keys = self._cache_keys[:n_common]
        return prompt.embed(self.pipeline.model, self.vision_cache, start=n_common)[None]

    def _reset_cache(self) -> None:
        self._cache, self._cache_keys = None, []

    def _record(self, loop: DecodeLoop, prompt: Prompt) -> None:
        row = loop.rows[0]
        self._cache = loop.cache
        self._cache_keys = list(prompt.keys) + list(row.fed)
        self.history.append(Turn("assistant", list(row.segments), tuple(row.tokens), loop.seed, row.reason))
