"""Agent authentication at the WebSocket upgrade: bearer parsing, the token authority, a positive cache.

    AuthError                   (a WarlockError)
    ├── Unauthorized            the token is missing, malformed or unknown → HTTP 401
    └── AuthorityUnavailable    the token authority did not answer → HTTP 503

A token is hashed as soon as it is read; only `shared.tokens.fingerprint` of the hash is ever logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as NATS

from shared import subjects
from shared.errors import ErrorCode, ProtocolError, WarlockError
from shared.ids import HostId
from shared.protocol import TokenOk, TokenVerifyRequest, decode_token_reply, encode
from shared.tokens import fingerprint, hash_token, is_well_formed

log = logging.getLogger(__name__)


class AuthError(WarlockError):
    """Authentication did not succeed."""


class Unauthorized(AuthError):
    """The token is missing, malformed or unknown to the authority."""


class AuthorityUnavailable(AuthError):
    """The token authority could not be reached or gave no usable answer."""


def parse_bearer(header: str | None) -> str | None:
    """Return the token of an ``Authorization: Bearer <token>`` header if it is well formed, else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not is_well_formed(token):
        return None
    return token


class TokenCache:
    """Positive answers of the authority, by token hash, for `ttl` seconds; at most `size` entries."""

    __slots__ = ("_clock", "_entries", "size", "ttl")

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.size = size
        self._clock = clock
        self._entries: dict[str, tuple[HostId, float]] = {}

    def get(self, token_hash: str) -> HostId | None:
        """The cached host of `token_hash`, or None when absent or expired."""
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._entries[token_hash]
            return None
        return entry[0]

    def put(self, token_hash: str, host: HostId) -> None:
        """Remember that `token_hash` belongs to `host`, evicting the oldest entries when full."""
        if self.ttl <= 0 or self.size <= 0:
            return
        self._entries.pop(token_hash, None)
        while len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[token_hash] = (host, self._clock() + self.ttl)

    def forget_host(self, host: HostId) -> None:
        """Drop every entry of `host` (its token was revoked)."""
        for key in [k for k, (h, _) in self._entries.items() if h == host]:
            del self._entries[key]

    def __len__(self) -> int:
        """Number of entries, expired ones included."""
        return len(self._entries)


class Authenticator:
    """Maps a bearer token to its host id through the cache and the NATS token authority."""

    def __init__(self, nc: NATS, cache: TokenCache, timeout: float) -> None:
        self.nc = nc
        self.cache = cache
        self.timeout = timeout

    async def host_for(self, token: str) -> HostId:
        """Return the host `token` belongs to; raise Unauthorized or AuthorityUnavailable."""
        token_hash = hash_token(token)
        host = self.cache.get(token_hash)
        if host is not None:
            return host
        request = encode(TokenVerifyRequest(token_sha256=token_hash))
        try:
            msg = await self.nc.request(subjects.TOKEN_VERIFY, request, timeout=self.timeout)
        except nats.errors.NoRespondersError as exc:
            raise AuthorityUnavailable("no token authority is running") from exc
        except nats.errors.TimeoutError as exc:
            raise AuthorityUnavailable("the token authority did not answer in time") from exc
        except nats.errors.Error as exc:
            raise AuthorityUnavailable(f"NATS unavailable: {type(exc).__name__}") from exc
        try:
            answer = decode_token_reply(msg.data)
        except ProtocolError as exc:
            raise AuthorityUnavailable(f"bad answer from the token authority: {exc.message}") from exc
        if isinstance(answer, TokenOk):
            self.cache.put(token_hash, answer.host_id)
            return answer.host_id
        if answer.code == ErrorCode.UNAUTHORIZED:
            raise Unauthorized(f"unknown token {fingerprint(token_hash)}")
        raise AuthorityUnavailable(f"token authority answered {answer.code}: {answer.description[:200]}")
