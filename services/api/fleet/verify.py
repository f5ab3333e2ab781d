"""What the API checks before it believes an agent: result and hello signatures, and who signed an
operator command. Pure functions plus one small counter; no I/O.

    result_problem(pub, host, result)   None when the agent's signature verifies, else why not
    hello_problem(pub, event, now)      the same for a presence event's hello signature
    Rejections                          counts what did not verify, logs each source once (no flood)

Why a result that does not verify becomes ``timed_out`` (error code ``bad_signature``): it is the status
this API already uses for "the command may have run and its outcome is unknown; it is never re-sent".
A forged answer proves nothing about the host, so the row must not say ``succeeded`` or ``failed``; a
genuine result that arrives later (``warlock.result.<host>``) may still settle it.
"""

from __future__ import annotations

import logging
from collections import Counter

from nacl.signing import VerifyKey

from shared import signing
from shared.protocol import ExecResult, Hello, PresenceConnected

log = logging.getLogger(__name__)

MAX_SOURCES = 10_000  # distinct sources remembered for log-once; past it the memory starts over


def _public(text: str | None) -> VerifyKey | None:
    if not text:
        return None
    try:
        return signing.parse_public(text)
    except ValueError:
        return None


def result_problem(public_key: str | None, host_id: str, result: ExecResult) -> str | None:
    """None when `result` carries the signature of `host_id`'s agent key `public_key`; else the reason."""
    public = _public(public_key)
    if public is None:
        return f"the API has no public key for the agent of {host_id}, so its result cannot be verified"
    if result.signature is None:
        return f"the result for {host_id} is not signed by its agent"
    if not signing.verify_result(public, host_id, result):
        return f"the result for {host_id} does not verify with its agent's key (forged or altered)"
    return None


def hello_problem(public_key: str | None, event: PresenceConnected, now: float | None = None) -> str | None:
    """None when the hello passed through in `event` is signed by the host's agent key, and fresh."""
    public = _public(public_key)
    if public is None:
        return f"the API has no public key for the agent of {event.host_id}"
    hello = Hello(
        host_id=event.host_id,
        hostname=event.hostname,
        platform=event.platform,
        agent_version=event.agent_version,
        signed_at=event.signed_at,
        signature=event.signature,
    )
    return signing.hello_problem(public, hello, now)


class Rejections:
    """Counts messages that did not verify, by kind and source; logs a source's first one.

    A source is what sent it as far as the API can tell (a host, a gateway id). Later rejections of the
    same source are logged again only at 10, 100, 1000, ... so an attacker cannot flood the log.
    """

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.total = 0

    def reject(self, kind: str, source: str, reason: str) -> None:
        """Count one rejected `kind` message from `source`; log it if it is the source's 1st, 10th, ..."""
        self.total += 1
        key = (kind, source)
        if key not in self.counts and len(self.counts) >= MAX_SOURCES:
            self.counts.clear()
        self.counts[key] += 1
        n = self.counts[key]
        if n == 1 or _power_of_ten(n):
            log.warning("%s from %s not accepted (%d so far from this source): %s", kind, source, n, reason)

    def count(self, kind: str, source: str | None = None) -> int:
        """How many `kind` messages were rejected (from `source`, or from anyone)."""
        if source is not None:
            return self.counts[(kind, source)]
        return sum(n for (k, _), n in self.counts.items() if k == kind)


def _power_of_ten(n: int) -> bool:
    while n % 10 == 0:
        n //= 10
    return n == 1
