"""Who owns a stored conversation: a random owner id, handed to the browser as a token signed with a key that only
the server holds (HMAC-SHA256), and checked on every call that names one.

Why a signature and not gradio's ``BrowserState`` encryption: ``BrowserState`` encrypts the browser's kept value
with a key that gradio puts into ``GET /config`` for every visitor, so that encryption hides nothing from anyone
who can load the page. The owner key here never leaves the server (it lives in the store's database, shared by the
app's replicas, and no endpoint returns it): a token cannot be forged, so whoever does not hold a browser's token
cannot read its conversations. What the token protects is what a bearer token protects: it is as good as the
browser that holds it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

TOKEN_VERSION = "o1"  # a token's first field: a later format can be told apart (and refused) by it
OWNER_ID = re.compile(r"[0-9a-f]{32}")
KEY = re.compile(r"[0-9a-f]{64}")  # the owner key as the store keeps it: 32 random bytes in hex


def new_key() -> str:
    return secrets.token_hex(32)


def _is_key(value: object) -> bool:
    """Checked at run time whatever the annotation says: a key read from a store or an option may be anything."""
    return isinstance(value, str) and KEY.fullmatch(value) is not None


@dataclass(frozen=True)
class OwnerTokens:
    """Issues and checks owner tokens ``o1.<owner id>.<signature>`` with ``key`` (64 hexadecimal digits)."""

    key: str

    def __post_init__(self) -> None:
        if not _is_key(self.key):
            raise ValueError("the owner key must be 64 hexadecimal digits (32 random bytes)")

    def new(self) -> tuple[str, str]:
        """A new owner: (its id, its token)."""
        owner = secrets.token_hex(16)
        return owner, self.token(owner)

    def token(self, owner: str) -> str:
        if not OWNER_ID.fullmatch(owner):
            raise ValueError(f"an owner id is 32 hexadecimal digits, got {owner!r}")
        return f"{TOKEN_VERSION}.{owner}.{self._sign(owner)}"

    def verify(self, token: object) -> str | None:
        """The owner id a token was issued for, or None when it is not a token this key signed."""
        if not isinstance(token, str) or len(token) > 200:
            return None
        version, _, rest = token.partition(".")
        owner, _, signature = rest.partition(".")
        if version != TOKEN_VERSION or not OWNER_ID.fullmatch(owner):
            return None
        return owner if hmac.compare_digest(signature, self._sign(owner)) else None

    def _sign(self, owner: str) -> str:
        mac = hmac.new(bytes.fromhex(self.key), f"owner:{owner}".encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode("ascii").rstrip("=")
