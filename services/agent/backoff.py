"""Reconnect policy as pure logic: which delay follows which way a session ended.

Capped exponential backoff with full jitter (``uniform(0, min(max, initial * 2**attempt))``), reset after
a session that lasted long enough; a gateway going away (1001) gets a prompt, lightly jittered retry; a
superseded session (4000) waits `superseded` seconds so two agents sharing a token do not flap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum

from shared.errors import CloseCode

STABLE_SESSION_S = 10.0
_MAX_EXPONENT = 30


class Outcome(StrEnum):
    """How a connection attempt or session ended."""

    CONNECT_FAILED = "connect_failed"  # no connection, handshake error, no welcome
    AUTH_REJECTED = "auth_rejected"  # HTTP 401 at the upgrade
    CLOSED = "closed"  # the session ended for another reason (error, ping timeout, close code)
    GOING_AWAY = "going_away"  # the gateway closed with 1001
    SUPERSEDED = "superseded"  # the gateway closed with 4000
    STOPPED = "stopped"  # the agent itself is stopping


@dataclass
class ReconnectPolicy:
    """Decides how long to wait before the next connection attempt."""

    initial: float = 0.5
    maximum: float = 30.0
    superseded: float = 60.0
    stable_after: float = STABLE_SESSION_S
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def backoff(self) -> float:
        """The next capped exponential delay with full jitter; counts one more failed attempt."""
        ceiling = min(self.maximum, self.initial * 2 ** min(self.attempt, _MAX_EXPONENT))
        self.attempt += 1
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        """Start the exponential sequence over."""
        self.attempt = 0

    def next_delay(self, outcome: Outcome, session_s: float = 0.0) -> float:
        """Seconds to wait after `outcome`; `session_s` is how long the session lasted (0 if none)."""
        if session_s > self.stable_after:
            self.reset()
        if outcome is Outcome.SUPERSEDED:
            return self.superseded
        if outcome is Outcome.GOING_AWAY:
            return self.rng.uniform(0, min(self.initial, self.maximum))
        if outcome is Outcome.STOPPED:
            return 0.0
        return self.backoff()


def outcome_of_close(code: int | None) -> Outcome:
    """Map the close code the gateway sent to how the agent reconnects."""
    if code == CloseCode.GOING_AWAY:
        return Outcome.GOING_AWAY
    if code == CloseCode.SUPERSEDED:
        return Outcome.SUPERSEDED
    return Outcome.CLOSED
