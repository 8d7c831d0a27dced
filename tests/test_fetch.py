"""Image fetching: the address policy (pure, on addresses) and real fetches from a server on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from fromage_gill.images import ImageError
from fromage_gill.retrieve.addresses import FetchError, address_refusal, resolve_checked
from fromage_gill.retrieve.fetch import DiskCache, FetchConfig, ImageFetcher


def _png(seed: int, size: int = 24) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


PNG = _png(0)
BIG = _png(1, 400)  # ~480 KB of noise: over the 100 KB cap used below


class _Handler(BaseHTTPRequestHandler):
    hits: list[str] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, body: bytes, ctype: str = "image/png", status: int = 200, length: bool = True, **headers):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802 -- http.server's API
        self.hits.append(self.path)
        path = self.path.split("?")[0]
        if path.startswith("/img"):
            self._send(_png(int(path[4:] or 0)) if path[4:].isdigit() else PNG)
        elif path == "/slow":
            time.sleep(2.0)
            self._send(PNG)
        elif path == "/big":
            self._send(BIG)
        elif path == "/big-unannounced":
            self.close_connection = True
            self._send(BIG, length=False)
        elif path == "/html":
            self._send(b"<html><body>not an image</body></html>", "text/html")
        elif path == "/liar":
            self._send(b"this is text pretending to be a png" * 10, "image/png")
        elif path == "/redirect":
            self._send(b"", status=302, Location="/img")
        elif path == "/redirect-metadata":
            self._send(b"", status=302, Location="http://169.254.169.254/latest/meta-data/")
        elif path == "/redirect-ftp":
            self._send(b"", status=302, Location="ftp://example.org/x.png")
        elif path == "/loop":
            self._send(b"", status=302, Location="/loop")
        else:
            self._send(b"not found", "text/plain", status=404)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def fetcher():
    f = ImageFetcher(
        FetchConfig(allow_private=True, connect_timeout=1.0, read_timeout=0.3, total_timeout=3.0, max_bytes=100_000)
    )
    yield f
    f.close()


# ------------------------------------------------------------------------------------------ policy (no traffic)


@pytest.mark.parametrize(
    "address, reason",
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.10", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("100.64.0.1", "not a public"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::1", "loopback"),
        ("192.0.2.1", "private"),  # documentation range (TEST-NET-1)
    ],
)
def test_policy_refuses_non_public_addresses(address, reason):
    got = address_refusal(address)
    assert got is not None and reason in got


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"])
def test_policy_allows_public_addresses(address):
    assert address_refusal(address) is None


def test_allow_private_still_refuses_metadata():
    assert address_refusal("10.0.0.1", allow_private=True) is None
    assert address_refusal("127.0.0.1", allow_private=True) is None
    assert "metadata" in address_refusal("169.254.169.254", allow_private=True)
    assert "metadata" in address_refusal("::ffff:169.254.169.254", allow_private=True)


def test_hostnames_are_checked_after_resolution():
    with pytest.raises(FetchError, match="localhost.*loopback"):
        resolve_checked("localhost", 80, allow_private=False)  # /etc/hosts, no traffic
    assert resolve_checked("127.0.0.1", 80, allow_private=True) == ["127.0.0.1"]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/a.png", "gopher://x/", "/just/a/path.png"])
def test_only_http_and_https(url):
    with pytest.raises(FetchError, match="only http and https"):
        ImageFetcher().fetch_url(url)


def test_config_is_validated():
    with pytest.raises(ValueError, match="read_timeout"):
        FetchConfig(read_timeout=0)
    with pytest.raises(ValueError, match="max_bytes"):
        FetchConfig(max_bytes=0)


# ------------------------------------------------------------------------------------------ fetching (loopback)


def test_fetches_an_image(server, fetcher):
    img = fetcher.fetch_url(f"{server}/img")
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(PNG)).convert("RGB")))


def test_default_policy_refuses_loopback_without_sending_anything(server):
    before = len(_Handler.hits)
    with pytest.raises(FetchError, match="127.0.0.1, a loopback address"):
        ImageFetcher().fetch_url(f"{server}/img")
    assert len(_Handler.hits) == before


def test_slow_response_times_out(server, fetcher):
    with pytest.raises(FetchError, match="timed out"):
        fetcher.fetch_url(f"{server}/slow")


def test_oversize_bodies_are_cut_off(server, fetcher):
    with pytest.raises(FetchError, match="announced, more than the 100000-byte limit"):
        fetcher.fetch_url(f"{server}/big")
    with pytest.raises(FetchError, match="cut off at the 100000-byte limit"):
        fetcher.fetch_url(f"{server}/big-unannounced")


def test_non_images_are_rejected(server, fetcher):
    with pytest.raises(FetchError, match=r"not an image \(Content-Type text/html\)"):
        fetcher.fetch_url(f"{server}/html")
    with pytest.raises(FetchError, match="not an image"):
        fetcher.fetch_url(f"{server}/liar")  # says image/png, is text
    with pytest.raises(FetchError, match="HTTP 404"):
        fetcher.fetch_url(f"{server}/missing")


def test_redirects_are_followed_and_checked(server, fetcher):
    assert fetcher.fetch_url(f"{server}/redirect").size == (24, 24)
    with pytest.raises(FetchError, match="169.254.169.254, a cloud metadata address.*after a redirect"):
        fetcher.fetch_url(f"{server}/redirect-metadata")
    with pytest.raises(FetchError, match="only http and https"):
        fetcher.fetch_url(f"{server}/redirect-ftp")
    with pytest.raises(FetchError, match="more than 3 redirects"):
        fetcher.fetch_url(f"{server}/loop")


def test_fetch_error_is_an_image_error(server, fetcher):
    with pytest.raises(ImageError):
        fetcher.fetch_url(f"{server}/html")


def test_failing_top1_falls_through_to_top2(server, fetcher, caplog):
    found = fetcher.fetch_first([f"{server}/slow", f"{server}/img7"])
    assert found is not None and found[0] == 1
    assert np.array_equal(np.asarray(found[1]), np.asarray(Image.open(io.BytesIO(_png(7))).convert("RGB")))
    found = fetcher.fetch_first(
        [
            f"{server}/missing",
            f"{server}/html",
            {"url": f"{server}/big"},
            {"path": "/no/such/file.png"},
            f"{server}/img3",
        ],
        window=2,
    )
    assert found is not None and found[0] == 4
    assert fetcher.fetch_first([f"{server}/missing", "ftp://x/y.png"]) is None  # never raises
    assert "skipping retrieval candidate" in caplog.text


def test_candidates_are_fetched_concurrently(server):
    f = ImageFetcher(FetchConfig(allow_private=True, read_timeout=5.0, total_timeout=6.0, max_workers=4))
    try:
        before = len(_Handler.hits)
        done = threading.Event()
        result = {}

        def run():
            result["found"] = f.fetch_first([f"{server}/slow", f"{server}/img1"])
            done.set()

        threading.Thread(target=run, daemon=True).start()
        # the second candidate is requested while the first is still waiting on /slow
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "/img1" not in _Handler.hits[before:]:
            time.sleep(0.02)
        assert "/slow" in _Handler.hits[before:] and "/img1" in _Handler.hits[before:]
        assert done.wait(10) and result["found"][0] == 0  # rank order wins: /slow does answer within 5 s
    finally:
        f.close()


def test_disk_cache_serves_repeats_and_stays_bounded(server, tmp_path):
    cfg = FetchConfig(allow_private=True, cache_dir=str(tmp_path / "cache"), cache_max_bytes=3 * len(PNG))
    f = ImageFetcher(cfg)
    try:
        before = len(_Handler.hits)
        a = f.fetch_url(f"{server}/img11")
        b = f.fetch_url(f"{server}/img11")
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert _Handler.hits[before:].count("/img11") == 1
        for i in range(20, 30):
            f.fetch_url(f"{server}/img{i}")
        assert f.cache.size() <= cfg.cache_max_bytes
        assert f.cache.get(f"{server}/img29") is not None  # the most recent stays
        with pytest.raises(FetchError):
            f.fetch_url(f"{server}/html")
        assert f.cache.get(f"{server}/html") is None  # only images are cached
    finally:
        f.close()


def test_disk_cache_evicts_least_recently_used(tmp_path):
    c = DiskCache(tmp_path, max_bytes=250)
    c.put("a", b"x" * 100)
    time.sleep(0.01)
    c.put("b", b"y" * 100)
    time.sleep(0.01)
    assert c.get("a") == b"x" * 100  # a is now more recent than b
    time.sleep(0.01)
    c.put("c", b"z" * 100)
    assert c.get("b") is None and c.get("a") is not None and c.get("c") is not None


def test_local_paths_use_the_pixel_limit(tmp_path):
    p = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(p)
    with pytest.raises(ImageError, match="pixels"):
        ImageFetcher().load(str(p))
    assert ImageFetcher().fetch_first([str(p)]) is None


def test_build_index_from_a_url_list(server, tiny_fromage, tmp_path):
    from fromage_gill.retrieve import ImageIndex, build_index

    (tmp_path / "urls.tsv").write_text(
        f"a noise square\t{server}/img5\nbroken\t{server}/html\ngone\t{server}/missing\nanother\t{server}/img6\n"
    )
    with pytest.raises(ValueError, match="no image"):  # the default policy refuses the loopback server
        build_index(tiny_fromage, tmp_path / "urls.tsv", tmp_path / "refused", progress=False)
    report = build_index(
        tiny_fromage,
        tmp_path / "urls.tsv",
        tmp_path / "ix",
        progress=False,
        fetch_config=FetchConfig(allow_private=True),
    )
    assert report.count == 2 and [n for n, _ in report.skipped] == [f"{server}/html", f"{server}/missing"]
    index = ImageIndex.load(tmp_path / "ix")
    assert [index.record(i)["caption"] for i in range(2)] == ["a noise square", "another"]
    index.set_fetch_config(FetchConfig(allow_private=True))
    found = index.fetch_first([0])
    assert found is not None and np.array_equal(np.asarray(found[1]), np.asarray(Image.open(io.BytesIO(_png(5)))))


# ------------------------------------------------------------------------------------------ one total deadline


DRIP_EVERY = 0.05  # seconds between bytes: never silent long enough for the read timeout
DRIP_FOR = 8.0  # the server gives up after this long, so a test of a fetcher without a deadline still ends
QUICK = dict(allow_private=True, connect_timeout=0.5, read_timeout=0.5, total_timeout=1.0)


class _DripHandler(socketserver.BaseRequestHandler):
    """Answers slowly on purpose, a byte at a time: the status line, a header, a chunk-size line or a whole body."""

    def handle(self):
        request = b""
        while b"\r\n\r\n" not in request:
            data = self.request.recv(4096)
            if not data:
                return
            request += data
        path = request.split(b" ", 2)[1].decode()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n"
        chunked = head + b"Transfer-Encoding: chunked\r\n\r\n"
        body = {
            "/drip-status": (b"", b"HTTP/1.1 200 OK" + b" " * 10_000),
            "/drip-headers": (head, b"X-Padding: " + b"a" * 10_000),
            "/drip-chunk-size": (chunked, b"0" * 10_000),  # a chunk-size line of leading zeros, never ending
            "/drip-chunked-body": (chunked, b"".join(b"1\r\n%c\r\n" % b for b in PNG) + b"0\r\n\r\n"),
            "/silent": (b"", b""),
        }.get(path, (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", b""))
        with contextlib.suppress(OSError):  # the client gave up: that is the point
            self.request.sendall(body[0])
            end = time.monotonic() + DRIP_FOR
            for byte in body[1]:
                if time.monotonic() > end:
                    break
                self.request.sendall(bytes([byte]))
                time.sleep(DRIP_EVERY)
            if not body[1]:
                time.sleep(DRIP_FOR)


@pytest.fixture(scope="module")
def drip_server():
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _DripHandler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("path", ["/drip-status", "/drip-headers", "/drip-chunk-size", "/drip-chunked-body"])
def test_a_dripping_server_cannot_outlast_the_total_timeout(drip_server, path):
    f = ImageFetcher(FetchConfig(**QUICK))
    t = time.monotonic()
    try:
        with pytest.raises(FetchError, match=r"took longer than the total timeout of 1.0s"):
            f.fetch_url(f"{drip_server}{path}")
    finally:
        f.close()
    assert time.monotonic() - t < 2.0  # 1 s, plus a loaded machine's slack; before: until the server gave up


def test_fetch_first_over_dead_urls_ends_within_the_total_timeout(drip_server):
    f = ImageFetcher(FetchConfig(**QUICK, max_workers=4))
    urls = [f"{drip_server}{p}" for p in ("/drip-headers", "/drip-chunk-size", "/silent", "/drip-status")]
    t = time.monotonic()
    try:
        assert f.fetch_first(urls) is None
    finally:
        f.close()
    assert time.monotonic() - t < 2.5  # all four at once, each ended by its own deadline


def test_a_slow_name_lookup_counts_against_the_total_timeout(server, monkeypatch):
    real = socket.getaddrinfo
    released = threading.Event()

    def slow_dns(host, *args, **kwargs):
        if host == "slow-dns.test":
            released.wait(5.0)  # a dead name server; released at the end of the test
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    f = ImageFetcher(FetchConfig(**QUICK))
    t = time.monotonic()
    try:
        with pytest.raises(FetchError, match="total timeout"):
            f.fetch_url(f"http://slow-dns.test:{server.rsplit(':', 1)[1]}/img")
        assert time.monotonic() - t < 2.0
    finally:
        released.set()
        f.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="makes its certificate with the openssl command")
def test_the_deadline_holds_over_tls(tmp_path):
    """The same drip behind TLS: the context's socket class bounds every read there too."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _DripHandler, bind_and_activate=False)
    srv.daemon_threads = True
    srv.server_bind()
    srv.server_activate()
    srv.socket = server_ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    f = ImageFetcher(FetchConfig(**QUICK))
    f._ssl.load_verify_locations(cert)  # trust the test's own certificate, nothing else changes
    try:
        t = time.monotonic()
        with pytest.raises(FetchError, match="total timeout of 1.0s"):
            f.fetch_url(f"https://127.0.0.1:{srv.server_address[1]}/drip-headers")
        assert time.monotonic() - t < 2.0
    finally:
        f.close()
        srv.shutdown()
        srv.server_close()


# ------------------------------------------------------------------------------------------ what allow_private opens


@pytest.mark.parametrize(
    "address, reason",
    [
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "not a public"),
        ("192.0.2.1", "special-purpose"),
        ("198.18.0.1", "special-purpose"),
        ("240.0.0.1", "reserved"),
        ("::ffff:0.0.0.0", "unspecified"),
    ],
)
def test_allow_private_opens_only_private_and_loopback(address, reason):
    got = address_refusal(address, allow_private=True)
    assert got is not None and reason in got


@pytest.mark.parametrize(
    "address", ["10.0.0.1", "172.31.255.1", "192.168.0.7", "127.0.0.1", "::1", "fd00::5", "::ffff:192.168.1.1"]
)
def test_allow_private_opens_private_and_loopback(address):
    assert address_refusal(address, allow_private=True) is None
    assert address_refusal(address) is not None


def test_link_local_is_a_separate_opt_in():
    assert address_refusal("169.254.10.20", allow_link_local=True) is None
    assert address_refusal("fe80::1", allow_link_local=True) is None
    assert "private" in address_refusal("10.0.0.1", allow_link_local=True)  # link-local only
    for metadata in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200"):
        assert "metadata" in address_refusal(metadata, allow_private=True, allow_link_local=True)
    with pytest.raises(FetchError, match=r"link-local address \(allow link-local .*allow_link_local=True"):
        resolve_checked("169.254.10.20", 80, allow_private=True)
    with pytest.raises(FetchError, match=r"private address \(allow private and loopback .*--allow-private-urls"):
        resolve_checked("10.1.2.3", 80, allow_private=False)


def test_unspecified_address_is_refused_even_with_allow_private(server, fetcher):
    port = server.rsplit(":", 1)[1]  # on Linux a connection to 0.0.0.0 reaches this very machine
    with pytest.raises(FetchError, match="0.0.0.0, an unspecified address"):
        fetcher.fetch_url(f"http://0.0.0.0:{port}/img")
