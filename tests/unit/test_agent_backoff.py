"""The reconnect policy, as pure logic with a seeded random source."""

from __future__ import annotations

import random

from services.agent.backoff import Outcome, ReconnectPolicy, outcome_of_close
from shared.errors import CloseCode


class MaxRandom(random.Random):
    """A random source whose uniform(a, b) always returns b: exposes the ceilings."""

    def uniform(self, a: float, b: float) -> float:
        """The upper bound."""
        return b


def test_exponential_ceiling_is_capped() -> None:
    """Ceilings double from `initial` and stop at `maximum`."""
    policy = ReconnectPolicy(initial=0.5, maximum=30, rng=MaxRandom())
    delays = [policy.next_delay(Outcome.CONNECT_FAILED) for _ in range(9)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_full_jitter_stays_within_bounds() -> None:
    """Every delay is within [0, ceiling] and they are not all equal."""
    policy = ReconnectPolicy(initial=1, maximum=8, rng=random.Random(7))
    delays = [policy.next_delay(Outcome.CLOSED) for _ in range(200)]
    assert all(0 <= d <= 8 for d in delays)
    assert len(set(delays)) > 100
    assert max(delays[5:]) > 4


def test_huge_attempt_does_not_overflow() -> None:
    """After very many failures the delay is still the cap, without overflow."""
    policy = ReconnectPolicy(initial=0.5, maximum=30, rng=MaxRandom(), attempt=5000)
    assert policy.next_delay(Outcome.AUTH_REJECTED) == 30


def test_reset_after_a_stable_session() -> None:
    """A session longer than 10 s starts the sequence over; a short one does not."""
    policy = ReconnectPolicy(initial=0.5, maximum=30, rng=MaxRandom())
    for _ in range(5):
        policy.next_delay(Outcome.CONNECT_FAILED)
    assert policy.next_delay(Outcome.CLOSED, session_s=3) == 16
    assert policy.next_delay(Outcome.CLOSED, session_s=11) == 0.5


def test_superseded_waits_the_superseded_backoff() -> None:
    """Close code 4000 waits `superseded` seconds, whatever the attempt count."""
    policy = ReconnectPolicy(initial=0.5, maximum=30, superseded=60, rng=MaxRandom())
    assert policy.next_delay(Outcome.SUPERSEDED) == 60
    assert policy.next_delay(Outcome.SUPERSEDED, session_s=100) == 60


def test_going_away_reconnects_promptly() -> None:
    """Close code 1001 retries within the initial delay, even after many failures."""
    policy = ReconnectPolicy(initial=0.5, maximum=30, rng=MaxRandom(), attempt=10)
    assert policy.next_delay(Outcome.GOING_AWAY) == 0.5


def test_close_codes_map_to_outcomes() -> None:
    """1001 → going away, 4000 → superseded, anything else → closed."""
    assert outcome_of_close(CloseCode.GOING_AWAY) is Outcome.GOING_AWAY
    assert outcome_of_close(CloseCode.SUPERSEDED) is Outcome.SUPERSEDED
    assert outcome_of_close(CloseCode.POLICY_VIOLATION) is Outcome.CLOSED
    assert outcome_of_close(None) is Outcome.CLOSED
