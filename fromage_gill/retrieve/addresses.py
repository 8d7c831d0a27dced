"""Which addresses a fetch may reach: public ones by default, private and loopback ranges only when allowed, and
cloud-metadata addresses never. A host is resolved once, every address checked, and the connection pinned to a
checked address (``connection.py``), so a second DNS answer cannot send it elsewhere."""

from __future__ import annotations

import ipaddress
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from ..images import ImageError
from .connection import DeadlinePassed

# Instance-metadata services hand out cloud credentials; never fetched, whatever the policy says.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean...
        "169.254.170.2",  # AWS ECS task metadata
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (legacy)
        "fd00:ec2::254",  # AWS IPv6
    )
)
# What allow_private opens: RFC 1918 and IPv6 unique-local ranges (loopback too). Python's is_private is wider (it
# includes link-local, 0.0.0.0/8, documentation and benchmarking ranges), so the ranges are spelled out.
PRIVATE_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))


class FetchError(ImageError):
    """A URL that could not be fetched as an image; the message names the URL and the reason."""


def address_refusal(
    address: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
    *,
    allow_private: bool = False,
    allow_link_local: bool = False,
) -> str | None:
    """Why we will not connect to ``address`` (a short reason), or None if we may. ``allow_private``: the private
    ranges and loopback too; ``allow_link_local``: link-local too. Cloud metadata addresses are always refused."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 is 127.0.0.1
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:  # 2002:7f00:1::/48 tunnels to 127.0.0.1
            ip = ip.sixtofour
        elif ip.teredo is not None:
            ip = ip.teredo[1]
        if ip.version == 6 and ip.scope_id:
            ip = ipaddress.ip_address(str(ip).split("%", 1)[0])
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    private = any(ip in net for net in PRIVATE_NETWORKS)
    if allow_private and (private or ip.is_loopback):
        return None
    if allow_link_local and ip.is_link_local:
        return None
    for attr, reason in (
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_unspecified", "an unspecified address"),
        ("is_reserved", "a reserved address"),
    ):
        if getattr(ip, attr):
            return reason
    if private:
        return "a private address"
    if ip.is_private:  # 0.0.0.0/8, 192.0.0.0/24, 192.0.2.0/24, 198.18.0.0/15, 2001:db8::/32...
        return "a special-purpose private address (this-network, documentation or benchmarking range)"
    if not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT)
        return "not a public address"
    return None


_resolver: ThreadPoolExecutor | None = None
_resolver_lock = threading.Lock()


def _getaddrinfo(host: str, port: int, timeout: float | None) -> list:
    """``socket.getaddrinfo``, given up after ``timeout`` seconds (it has no timeout of its own: a dead name server
    holds it for the resolver's retries). The lookup itself finishes in the background."""
    if timeout is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    global _resolver
    with _resolver_lock:
        if _resolver is None:
            _resolver = ThreadPoolExecutor(8, thread_name_prefix="fetch-dns")
    future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        return future.result(timeout=max(timeout, 0.0))
    except FutureTimeout:
        future.cancel()
        raise DeadlinePassed(f"resolving {host!r}") from None


def resolve_checked(
    host: str, port: int, *, allow_private: bool, allow_link_local: bool = False, timeout: float | None = None
) -> list[str]:
    """The addresses of ``host``, all of them allowed by the policy; refuses if any is not (a mixed answer is how
    DNS tricks get in). ``timeout``: seconds the lookup may take (None: the resolver's own)."""
    try:
        infos = _getaddrinfo(host, port, timeout)
    except (socket.gaierror, UnicodeError) as e:
        raise FetchError(f"cannot resolve host {host!r}: {e}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for a in addresses:
        reason = address_refusal(a, allow_private=allow_private, allow_link_local=allow_link_local)
        if reason is not None:
            hint = ""
            if reason in ("a loopback address", "a private address") and not allow_private:
                hint = (
                    " (allow private and loopback addresses with FetchConfig(allow_private=True) / "
                    "--allow-private-urls)"
                )
            elif reason == "a link-local address" and not allow_link_local:
                hint = " (allow link-local addresses with FetchConfig(allow_link_local=True) / --allow-link-local-urls)"
            raise FetchError(f"refused: host {host!r} resolves to {a}, {reason}{hint}")
    if not addresses:
        raise FetchError(f"cannot resolve host {host!r}: no addresses")
    return addresses
