"""Fetching images for retrieval results: local files and http(s) URLs, with limits so a bad URL cannot hang or harm us.

A URL is fetched only if
- its scheme is http or https;
- every address its host resolves to is public (``address_refusal``): loopback, private, link-local, CGNAT,
  multicast, reserved and cloud-metadata addresses are refused by default. The connection goes to the address that
  was checked (no second DNS lookup an attacker could answer differently), and every redirect hop is checked again.
  ``FetchConfig(allow_private=True)`` allows the private ranges (10/8, 172.16/12, 192.168/16, fc00::/7) and
  loopback (an intranet image server, a test's local server); ``allow_link_local=True`` allows 169.254/16 and
  fe80::/10 as well. Everything else non-public (0.0.0.0, multicast, CGNAT, documentation and reserved ranges) stays
  refused, and cloud-metadata addresses are refused whatever the configuration;
- it answers within ``connect_timeout`` (per address) and ``read_timeout`` (per socket read), and the whole fetch
  (DNS, connect, TLS, headers, every chunk-size line and body byte, redirects) ends by ``total_timeout``: every
  socket read waits at most what is left of it, so a server dripping a byte at a time cannot hold a fetch longer;
- its body is at most ``max_bytes`` (announced or not: reading stops one byte past the cap);
- the body is an image: not a text/HTML/JSON Content-Type, known image magic bytes, and it decodes under the
  pixel limit of ``images.load_image``.
Environment proxies are not used: the address policy is about where our own connection goes.

``ImageFetcher.fetch_first`` fetches the top candidates concurrently and returns the first, in rank order, that
worked; failures are logged, never raised, so a dead URL costs at most its timeout.
Validated URL bodies go to a bounded on-disk cache (least recently used files evicted first).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import math
import os
import ssl
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from PIL import Image

from ..images import MAX_IMAGE_PIXELS, ImageError, load_image
from .addresses import FetchError, resolve_checked
from .connection import Deadline, DeadlinePassed, DeadlineSSLSocket, PinnedHTTPConnection, PinnedHTTPSConnection
from .sources import ImageItem, is_url, read_item_bytes

logger = logging.getLogger(__name__)

REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NOT_IMAGE_TYPES = ("text/", "application/json", "application/xml", "application/xhtml", "application/javascript")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


@dataclass(frozen=True)
class FetchConfig:
    connect_timeout: float = 3.0  # seconds to open the connection (per address tried)
    read_timeout: float = 5.0  # seconds of silence allowed while waiting for headers or body
    total_timeout: float = 15.0  # seconds for the whole fetch: DNS, connect, headers, body, redirects (a drip ends)
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = MAX_IMAGE_PIXELS
    max_redirects: int = 3
    allow_private: bool = False  # private ranges and loopback (PRIVATE_NETWORKS)
    allow_link_local: bool = False  # 169.254/16 and fe80::/10 (cloud metadata addresses stay refused)
    cache_dir: str | None = None  # None: no cache
    cache_max_bytes: int = 512 * 1024 * 1024
    max_workers: int = 4  # concurrent fetches (also the number of candidates fetched ahead)
    user_agent: str = "fromage-gill/0.1 (image retrieval)"

    def __post_init__(self):
        for name in ("connect_timeout", "read_timeout", "total_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FetchConfig.{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("max_bytes", "max_pixels", "max_workers", "cache_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"FetchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_redirects < 0:
            raise ValueError(f"FetchConfig.max_redirects must be >= 0, got {self.max_redirects}")


# ------------------------------------------------------------------------------------------ address policy


# ------------------------------------------------------------------------------------------ cache


class DiskCache:
    """Validated image bytes keyed by URL, at most ``max_bytes`` on disk; least recently used files go first."""

    def __init__(self, directory: str | Path, max_bytes: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def _path(self, url: str) -> Path:
        return self.directory / hashlib.sha256(url.encode()).hexdigest()

    def get(self, url: str) -> bytes | None:
        p = self._path(url)
        try:
            data = p.read_bytes()
            os.utime(p)  # recently used
            return data
        except OSError:
            return None

    def put(self, url: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        p = self._path(url)
        tmp = p.with_name(f".{p.name}.{threading.get_ident()}.tmp")
        with self._lock:
            try:
                tmp.write_bytes(data)
                os.replace(tmp, p)
                self._evict()
            except OSError as e:  # a full or read-only disk must not break retrieval
                logger.warning("image cache %s: cannot write (%s)", self.directory, e)
                tmp.unlink(missing_ok=True)

    def size(self) -> int:
        return sum(e.stat().st_size for e in os.scandir(self.directory) if e.is_file() and not e.name.startswith("."))

    def _evict(self) -> None:
        entries = [
            (e.stat().st_mtime, e.stat().st_size, e.path)
            for e in os.scandir(self.directory)
            if e.is_file() and not e.name.startswith(".")
        ]
        total = sum(s for _, s, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            _unlink(path)
            total -= size


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # another thread or process evicted it first
        os.unlink(path)


# ------------------------------------------------------------------------------------------ fetching


class ImageFetcher:
    """Loads the images of index records (local files, tar members, URLs) under one ``FetchConfig``.

    ``base_dir``: where relative paths in records are resolved (an index's own folder).
    """

    def __init__(self, config: FetchConfig | None = None, *, base_dir: str | Path | None = None):
        self.config = config or FetchConfig()
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.cache = DiskCache(self.config.cache_dir, self.config.cache_max_bytes) if self.config.cache_dir else None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._ssl = ssl.create_default_context()
        self._ssl.sslsocket_class = DeadlineSSLSocket

    # -------------------------------------------------------------------------------- one image

    def load(self, source: str | Path | dict | ImageItem) -> Image.Image:
        """A record dict (``url`` or ``path`` [+ ``member``/``offset``/``size``]), an ImageItem, a URL or a path."""
        if isinstance(source, dict):
            url, path = source.get("url"), source.get("path")
            if url:
                return self.fetch_url(url)
            if not path:
                raise ImageError(f"record {source} has neither a url nor a path")
            resolved = str(self._resolve(path))
            item = ImageItem(
                name=resolved if source.get("member") is None else f"{resolved}:{source['member']}",
                path=resolved,
                member=source.get("member"),
                offset=source.get("offset"),
                size=source.get("size"),
            )
            return self.load(item)
        if isinstance(source, ImageItem):
            if source.url is not None:
                return self.fetch_url(source.url)
            if source.member is None:
                assert source.path is not None, "an ImageItem without a url has a path"
                return load_image(
                    self._resolve(source.path),
                    max_pixels=self.config.max_pixels,
                    max_bytes=self.config.max_bytes,
                    name=source.name,
                )
            data = read_item_bytes(source, self.config.max_bytes)
            return load_image(
                data, max_pixels=self.config.max_pixels, max_bytes=self.config.max_bytes, name=source.name
            )
        if isinstance(source, str) and is_url(source):
            return self.fetch_url(source)
        return load_image(self._resolve(source), max_pixels=self.config.max_pixels, max_bytes=self.config.max_bytes)

    def _resolve(self, path: str | Path) -> Path:
        p = Path(path)
        return p if p.is_absolute() or self.base_dir is None else self.base_dir / p

    def fetch_url(self, url: str) -> Image.Image:
        """Fetch and decode one image URL under the policy; raises FetchError (an ImageError) saying why not."""
        data = self.fetch_bytes(url)
        return load_image(data, max_pixels=self.config.max_pixels, max_bytes=self.config.max_bytes, name=url)

    def fetch_bytes(self, url: str) -> bytes:
        if self.cache is not None and (data := self.cache.get(url)) is not None:
            return data
        data = self._download(url)
        try:  # decode once before caching so the cache only ever holds images
            load_image(data, max_pixels=self.config.max_pixels, max_bytes=self.config.max_bytes, name=url)
        except ImageError as e:
            raise FetchError(str(e)) from None
        if self.cache is not None:
            self.cache.put(url, data)
        return data

    def _download(self, url: str) -> bytes:
        cfg = self.config
        deadline = Deadline(cfg.total_timeout, cfg.read_timeout)  # one clock for every hop and every read
        try:
            return self._follow(url, deadline)
        except DeadlinePassed:
            raise FetchError(f"{url}: took longer than the total timeout of {cfg.total_timeout}s") from None

    def _follow(self, url: str, deadline: Deadline) -> bytes:
        cfg = self.config
        current = url
        for _ in range(cfg.max_redirects + 1):
            parts = urlsplit(current)
            if parts.scheme not in ("http", "https"):
                raise FetchError(
                    f"{url}: only http and https URLs are fetched, not {parts.scheme or 'no scheme'!r}"
                    + ("" if current == url else f" (redirected to {current})")
                )
            host = parts.hostname
            if not host:
                raise FetchError(f"{url}: no host in {current!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                addresses = resolve_checked(
                    host,
                    port,
                    allow_private=cfg.allow_private,
                    allow_link_local=cfg.allow_link_local,
                    timeout=deadline.timeout(math.inf),
                )
            except FetchError as e:
                raise FetchError(
                    f"{url}: {e}" + ("" if current == url else f" (after a redirect to {current})")
                ) from None
            conn = self._connect(parts.scheme, host, port, addresses, url, deadline)
            try:
                target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                conn.request(
                    "GET",
                    target,
                    headers={
                        "User-Agent": cfg.user_agent,
                        "Accept": "image/*",
                        "Accept-Encoding": "identity",
                        "Connection": "close",
                    },
                )
                resp = conn.getresponse()
                if resp.status in REDIRECTS:
                    location = resp.getheader("Location")
                    if not location:
                        raise FetchError(f"{url}: HTTP {resp.status} redirect without a Location")
                    current = urljoin(current, location)
                    continue
                if resp.status != 200:
                    raise FetchError(f"{url}: HTTP {resp.status} {resp.reason}")
                return self._read_body(resp, url, deadline)
            except TimeoutError as e:  # a read waits at most what is left: its timing out may be the deadline's
                if isinstance(e, DeadlinePassed) or deadline.left() <= 0:
                    raise DeadlinePassed("total timeout") from None
                raise FetchError(f"{url}: timed out (read timeout {cfg.read_timeout}s)") from None
            except (OSError, http.client.HTTPException) as e:
                raise FetchError(f"{url}: {type(e).__name__}: {e}") from None
            finally:
                conn.close()
        raise FetchError(f"{url}: more than {cfg.max_redirects} redirects")

    def _connect(
        self, scheme: str, host: str, port: int, addresses: list[str], url: str, deadline: Deadline
    ) -> http.client.HTTPConnection:
        cfg = self.config
        last: Exception | None = None
        for address in addresses:
            timeout = deadline.timeout(cfg.connect_timeout)  # DeadlinePassed once nothing is left for this address
            if scheme == "https":
                conn = PinnedHTTPSConnection(host, port, address, deadline, cfg.connect_timeout, self._ssl)
            else:
                conn = PinnedHTTPConnection(host, port, address, deadline, cfg.connect_timeout)
            try:
                conn.connect()
                return conn
            except DeadlinePassed:
                conn.close()
                raise
            except TimeoutError:
                last = FetchError(f"{url}: connection to {address} timed out after {timeout:.1f}s")
            except OSError as e:
                last = FetchError(f"{url}: cannot connect to {address}: {e}")
            conn.close()
        if deadline.left() <= 0:  # the last address's connect timed out at the deadline
            raise DeadlinePassed("total timeout")
        raise last if last is not None else FetchError(f"{url}: no address to connect to")

    def _read_body(self, resp: http.client.HTTPResponse, url: str, deadline: Deadline) -> bytes:
        cfg = self.config
        ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if ctype.startswith(_NOT_IMAGE_TYPES):
            raise FetchError(f"{url}: not an image (Content-Type {ctype})")
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > cfg.max_bytes:
            raise FetchError(f"{url}: {int(length)} bytes announced, more than the {cfg.max_bytes}-byte limit")
        chunks, total = [], 0
        while True:
            deadline.timeout(math.inf)  # between reads too: each socket read inside read1 is bounded as well
            chunk = resp.read1(min(65536, cfg.max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cfg.max_bytes:
                raise FetchError(f"{url}: body cut off at the {cfg.max_bytes}-byte limit")
        data = b"".join(chunks)
        if not data:
            raise FetchError(f"{url}: empty body")
        if not (data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")):
            raise FetchError(f"{url}: not an image (content starts with {data[:16]!r})")
        return data

    # -------------------------------------------------------------------------------- candidates

    def try_load(self, source) -> Image.Image | None:
        """``load`` that logs the failure and returns None: for callers that move on to the next candidate."""
        try:
            return self.load(source)
        except Exception as e:  # noqa: BLE001 -- a broken candidate must never break the conversation
            logger.warning("skipping retrieval candidate %s: %s", _describe(source), e)
            return None

    def fetch_first(self, sources: Sequence, *, window: int | None = None) -> tuple[int, Image.Image] | None:
        """(position in ``sources``, image) of the first candidate, in order, that loads; None if none does.

        Up to ``window`` (default ``max_workers``) candidates are fetched at once, so a dead top-1 costs at most its
        timeout while the next ones are already on their way."""
        window = max(1, window or self.config.max_workers)
        pool = self._executor()
        futures: dict[int, Future] = {}

        def submit_until(n: int) -> None:
            for j in range(len(futures), min(n, len(sources))):
                futures[j] = pool.submit(self.try_load, sources[j])

        try:
            for i in range(len(sources)):
                submit_until(i + window)
                img = futures[i].result()
                if img is not None:
                    return i, img
            return None
        finally:
            for f in futures.values():
                f.cancel()  # not started yet: never started; running ones end within their timeouts

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.config.max_workers, thread_name_prefix="fetch")
            return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _describe(source) -> str:
    if isinstance(source, dict):
        return str(source.get("url") or source.get("path"))
    if isinstance(source, ImageItem):
        return source.name
    return str(source)
