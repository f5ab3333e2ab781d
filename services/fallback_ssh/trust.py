"""What the SSH worker checks before it dials anything: the API's signature, the host, and replays.

Every request that makes the worker dial or change a host is signed by the API (`shared.signing`):

    warlock.ssh.<host>.exec        kind "ssh_exec"   fields command_id, command, timeout, target
    warlock.ssh.<host>.install     kind "install"    every field but wheel_b64 (its SHA-256 is signed)
    warlock.ssh.<host>.uninstall   kind "uninstall"
    warlock.ssh.<host>.configure   kind "configure"
    warlock.ssh.probe              kind "probe"      address, port, username; for request.host_id

The host a request is for comes from its subject (the probe's from its own `host_id`) and must be the
one the signature names; a request's own `host_id` field must name it too. The SSH target (address,
port, user, pinned host key) is taken only from the signed fields, so a request that names another
address fails with ``bad_signature``.

Replays: each accepted request's id (its command id; a probe's signature) is remembered until its
not-after, when the signature alone refuses it (``expired``). Memory is bounded: a signed request is
valid for at most `max_ttl` seconds, and at most `capacity` ids are kept; when they are all still live a
new request is answered ``busy`` (nothing ran), never accepted unremembered. The memory is this
process's: workers in the queue group do not share it (each request reaches one of them).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable

from shared import signing
from shared.errors import ErrorCode
from shared.protocol import CommandSignature, Message
from shared.signing import CommandRefused


class ReplayMemory:
    """Ids of accepted signed requests, each until its not-after (bounded)."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.time) -> None:
        self.capacity = capacity
        self.clock = clock
        self._until: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []  # heap of (not_after, id)

    def __len__(self) -> int:
        return len(self._until)

    def _forget_expired(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            until, key = heapq.heappop(self._expiry)
            if self._until.get(key) == until:
                del self._until[key]

    def remember(self, key: str, not_after: float) -> None:
        """Record `key` until `not_after`; CommandRefused: replay if already recorded, busy if full."""
        now = self.clock()
        self._forget_expired(now)
        if key in self._until:
            raise CommandRefused(
                ErrorCode.REPLAY, f"request {key[:64]} was already received by this worker; nothing ran again"
            )
        if len(self._until) >= self.capacity:
            raise CommandRefused(
                ErrorCode.BUSY,
                f"the worker remembers {self.capacity} signed requests that are still valid; retry later "
                "(nothing ran)",
            )
        self._until[key] = not_after
        heapq.heappush(self._expiry, (not_after, key))


class Verifier:
    """Checks signed requests against the trusted keys and the replay memory."""

    def __init__(
        self, trusted_keys: list[str], max_ttl: float, capacity: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.trusted = signing.TrustedKeys(trusted_keys)
        self.max_ttl = max_ttl
        self.clock = clock
        self.replays = ReplayMemory(capacity, clock)

    def check(self, kind: str, message: Message, host_id: str, replay_id: str | None = None) -> str:
        """Verify `message` (kind `kind`) for `host_id` and record it; return the signer's key id.

        `replay_id` (default: the signature itself) is what a replay repeats. Raises CommandRefused:
        unsigned, unknown_key, bad_signature, wrong_host, expired, replay (or busy when memory is full).
        """
        signature = getattr(message, "signature", None)
        if signature is not None and not isinstance(signature, CommandSignature):  # pragma: no cover
            raise CommandRefused(ErrorCode.BAD_SIGNATURE, f"{kind}: malformed signature")
        key = signing.verify_command(
            kind,
            signing.signed_fields(message),
            signature,
            self.trusted,
            host_id,
            self.max_ttl,
            now=self.clock(),
        )
        assert signature is not None  # verify_command refuses an unsigned request
        self.replays.remember(replay_id or f"sig:{signature.sig}", signature.not_after)
        return key
