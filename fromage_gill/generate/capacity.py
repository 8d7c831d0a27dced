"""Server-wide memory admission for decoding user images: ``ImageBudget`` and the typed ``OverCapacity`` error.

A compressed attachment is small and its decoded pixels are not: an 8000x8000 PNG of a few MB decodes to ~190 MB (and
a copy while it is converted to RGB). Eight clients at once took a server from 1.5 GB to 19.7 GB when every upload was
decoded as it arrived. The budget admits a decode only while the bytes its header announces fit under one server-wide
bound; past it a request waits (up to a timeout) or gets ``OverCapacity``, which a server answers with 429. What is
kept after decoding is the caller's to bound (the chat keeps at most ``MAX_KEPT_IMAGE_PIXELS``).
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable, Generator

from PIL import Image

from ..images import MAX_IMAGE_PIXELS, ImageError, load_image

# While decoding, a pixel is held once as decoded (up to 4 bands: RGBA, CMYK) and once more as its RGB conversion.
DECODE_BYTES_PER_PIXEL = 4 + 3


class OverCapacity(RuntimeError):
    """The server is at capacity for this kind of work right now; the request may be retried later (HTTP 429).
    ``retry_after_s`` is a hint, not a promise."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ImageBudget:
    """At most ``max_bytes`` of image decoding at once, server-wide. ``reserve(n)`` holds n bytes for a block;
    ``decode(data)`` decodes one upload under a reservation sized from its header. Thread-safe; waiters are served in
    no particular order."""

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"the image budget must be an integer number of bytes >= 1, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._used = 0
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._cond:
            return self._used

    @contextlib.contextmanager
    def reserve(self, nbytes: int, *, timeout: float | None = 0.0) -> Generator[None, None, None]:
        """Hold ``nbytes`` of the budget for the block. Waits up to ``timeout`` seconds for room (None: as long as it
        takes, 0: not at all), then raises ``OverCapacity``. A request larger than the whole budget fails at once."""
        if nbytes > self.max_bytes:
            raise OverCapacity(
                f"decoding this image needs {nbytes / 2**20:,.0f} MiB, more than the server's whole image budget of "
                f"{self.max_bytes / 2**20:,.0f} MiB; send a smaller image",
                retry_after_s=0.0,
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._used + nbytes > self.max_bytes:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise OverCapacity(
                        f"the server is decoding {self._used / 2**20:,.0f} MiB of images and this one needs "
                        f"{nbytes / 2**20:,.0f} MiB more than its budget of {self.max_bytes / 2**20:,.0f} MiB "
                        f"allows; retry shortly"
                    )
                self._cond.wait(left)
            self._used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self._used -= nbytes
                self._cond.notify_all()

    @contextlib.contextmanager
    def admit(self, data: bytes, *, name: str = "image", timeout: float | None = 0.0) -> Generator[None, None, None]:
        """Hold, for the block, what decoding ``data`` (an encoded image) takes, as its header announces: decode it
        inside. Raises ``ImageError`` for a bad or oversized image (before any reservation) and ``OverCapacity``
        past the budget."""
        try:
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                w, h = header.size
        except Exception:  # not an image (or a refused one): load_image says exactly why
            load_image(data, name=name)
            raise ImageError(f"{name}: not a readable image") from None
        if w * h > MAX_IMAGE_PIXELS:  # refused from its header (ImageError: bad input, not a full server)
            load_image(data, name=name)
        with self.reserve(w * h * DECODE_BYTES_PER_PIXEL, timeout=timeout):
            yield

    def decode(
        self,
        data: bytes,
        *,
        name: str = "image",
        timeout: float | None = 0.0,
        keep: Callable[[Image.Image], Image.Image] | None = None,
    ) -> Image.Image:
        """``data`` decoded to RGB (``images.load_image``) under ``admit``; ``keep`` (e.g. ``kept_image``) shrinks it
        before the reservation ends, so what outlives the decode is what is kept."""
        with self.admit(data, name=name, timeout=timeout):
            image = load_image(data, name=name)
            return keep(image) if keep is not None else image
