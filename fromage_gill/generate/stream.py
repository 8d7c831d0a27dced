"""Incremental detokenization: text is shown as it is decoded, holding back what may begin a stop string; and the
published code's answer cut (``truncate_caption``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TextStream:
    """Incremental detokenization of one run of text tokens, holding back text that may begin a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str]):
        self.tok = tokenizer
        self.stops = tuple(stop_strings)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self._prefix = self._read = 0
        self.skip_leading = ""  # characters at the start of the text where no stop string is looked for

    def _decode(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert isinstance(text, str), "one sequence of ids decodes to one text"
        return text

    def add(self, token: int) -> None:
        # Decode a small window so that a multi-byte character split over tokens appears once it is complete.
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def find_stop(self) -> int | None:
        """Character index where the first stop string starts, if one has appeared."""
        longest = max((len(s) for s in self.stops), default=0)
        start = max(self.emitted - longest, 0)
        if self.skip_leading:
            start = max(start, len(self.text) - len(self.text.lstrip(self.skip_leading)))
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def delta(self, final: bool = False) -> str:
        """Text that can be shown now: all of it when ``final``, else all but a suffix that may start a stop string."""
        if final:
            rest = self._decode(self.ids[self._prefix :])
            before = self._decode(self.ids[self._prefix : self._read])
            if len(rest) > len(before):
                self.text += rest[len(before) :]
                self._prefix = self._read = len(self.ids)
            end = len(self.text)
        else:
            hold = 0
            for s in self.stops:
                for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                    if self.text.endswith(s[:n]):
                        hold = n
                        break
            end = len(self.text) - hold
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def truncate(self, at: int) -> None:
        """Forget the text from ``at`` on (a stop string) and anything not decoded yet."""
        self.text = self.text[:at]
        self._prefix = self._read = len(self.ids)
        self.emitted = min(self.emitted, at)

    def cut(self, at: int) -> list[int]:
        """Token ids that spell exactly ``text[:at]``: the longest prefix of the run's tokens that fits, then the
        rest re-tokenized (a stop string may begin inside a token)."""
        want = self.text[:at]
        for k in range(len(self.ids), -1, -1):
            t = self._decode(self.ids[:k])
            if want.startswith(t):
                rest = want[len(t) :]
                extra = self.tok(rest, add_special_tokens=False).input_ids if rest else []
                return self.ids[:k] + list(extra)
        return list(self.tok(want, add_special_tokens=False).input_ids)


def published_cut(text: str) -> tuple[int, int]:
    """Where the published code's ``utils.truncate_caption`` cuts ``text``: ``text[start:end]`` is its result.

    Its rule: strip newlines at both ends; then keep up to and including the first newline, or, where there is
    none, the first full stop; text with neither is kept whole."""
    start = len(text) - len(text.lstrip("\n"))
    body = text.strip("\n")
    cut = body.find("\n") + 1 or body.find(".") + 1
    return start, start + (cut if cut > 0 else len(body))


def truncate_caption(text: str) -> str:
    """The published code's answer cut (see ``published_cut``): ``"A dog. It runs."`` -> ``"A dog."``."""
    start, end = published_cut(text)
    return text[start:end]


def take_token(stream: TextStream, tokens: list[int], run_start: int, tok: int) -> bool:
    """A text token joins the answer's ``tokens`` and its text run (``tokens[run_start:]``); True when it completes a
    stop string, the run then cut before it (the decode loop's and the engine's rule)."""
    tokens.append(tok)
    stream.add(tok)
    at = stream.find_stop()
    if at is None:
        return False
    tokens[run_start:] = stream.cut(at)
    stream.truncate(at)
    return True
