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
    """Positive answers of the authority, by token hash, for `ttl` seconds; at most `size` entries.

    It also remembers revocations for `horizon` seconds, so that an authority answer or an upgrade that
    was already under way when a revocation arrived cannot bring the revoked token back.
    """

    __slots__ = ("_clock", "_entries", "_revoked_hashes", "_revoked_hosts", "horizon", "size", "ttl")

    def __init__(
        self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic, horizon: float = 120.0
    ) -> None:
        self.ttl = ttl
        self.size = size
        self.horizon = horizon
        self._clock = clock
        self._entries: dict[str, tuple[HostId, float]] = {}
        self._revoked_hashes: dict[str, float] = {}  # token hash → when revoked
        self._revoked_hosts: dict[HostId, float] = {}  # host → when all its tokens were revoked

    def now(self) -> float:
        """The cache's clock (monotonic seconds)."""
        return self._clock()

    def get(self, token_hash: str) -> HostId | None:
        """The cached host of `token_hash`, or None when absent or expired."""
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._entries[token_hash]
            return None
        return entry[0]

    def put(self, token_hash: str, host: HostId, asked_at: float | None = None) -> None:
        """Remember that `token_hash` belongs to `host`, evicting the oldest entries when full.

        Nothing is stored when the token was revoked since `asked_at` (when the authority was asked).
        """
        if self.ttl <= 0 or self.size <= 0:
            return
        if self.revoked_since(host, token_hash, self._clock() if asked_at is None else asked_at):
            return
        self._entries.pop(token_hash, None)
        while len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[token_hash] = (host, self._clock() + self.ttl)

    def forget_host(self, host: HostId) -> None:
        """Drop every entry of `host` (its token was revoked)."""
        for key in [k for k, (h, _) in self._entries.items() if h == host]:
            del self._entries[key]

    def forget(self, token_hash: str) -> None:
        """Drop the entry of `token_hash`, if any."""
        self._entries.pop(token_hash, None)

    def revoke(self, host: HostId, token_hash: str | None) -> None:
        """Drop a revoked token (every token of `host` when `token_hash` is None) and remember that."""
        now = self._clock()
        self._revoked_hashes = {k: at for k, at in self._revoked_hashes.items() if at > now - self.horizon}
        self._revoked_hosts = {k: at for k, at in self._revoked_hosts.items() if at > now - self.horizon}
        if token_hash is None:
            self.forget_host(host)
            self._revoked_hosts[host] = now
        else:
            self.forget(token_hash)
            self._revoked_hashes[token_hash] = now
        while len(self._revoked_hashes) > max(self.size, 1):
            del self._revoked_hashes[next(iter(self._revoked_hashes))]

    def revoked_since(self, host: HostId, token_hash: str, since: float) -> bool:
        """Whether `token_hash` was revoked (recently), or every token of `host` was revoked at or after
        `since`."""
        if token_hash in self._revoked_hashes:
            return True
        at = self._revoked_hosts.get(host)
        return at is not None and at >= since

    def __len__(self) -> int:
        """Number of entries, expired ones included."""
        return len(self._entries)


class Authenticator:
    """Maps a bearer token to its host id through the cache and the NATS token authority."""

    def __init__(self, nc: NATS, cache: TokenCache, timeout: float) -> None:
        self.nc = nc
        self.cache = cache
        self.timeout = timeout
        # the agent key the authority last named per host (None: not enrolled yet); bounded like the cache
        self.agent_keys: dict[HostId, str | None] = {}

    def agent_key(self, host: HostId) -> str | None:
        """The agent public key the token authority gave for `host` (None: it knows none)."""
        return self.agent_keys.get(host)

    async def host_for(self, token: str) -> HostId:
        """Return the host `token` belongs to; raise Unauthorized or AuthorityUnavailable."""
        token_hash = hash_token(token)
        host = self.cache.get(token_hash)
        if host is not None:
            return host
        asked_at = self.cache.now()
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
            if self.cache.revoked_since(answer.host_id, token_hash, asked_at):
                raise Unauthorized(f"token {fingerprint(token_hash)} was revoked")
            self.cache.put(token_hash, answer.host_id, asked_at)
            self.agent_keys.pop(answer.host_id, None)
            while len(self.agent_keys) >= max(self.cache.size, 1):
                del self.agent_keys[next(iter(self.agent_keys))]
            self.agent_keys[answer.host_id] = answer.public_key
            return answer.host_id
        if answer.code == ErrorCode.UNAUTHORIZED:
            raise Unauthorized(f"unknown token {fingerprint(token_hash)}")
        raise AuthorityUnavailable(f"token authority answered {answer.code}: {answer.description[:200]}")
