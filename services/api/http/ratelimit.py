"""Per-key rate limits: token buckets in this API instance's memory.

Each API key has two buckets per instance: one for reads (GET) and one for everything else (exec, jobs,
cancel, admin changes). A bucket holds up to `burst` tokens, refills at `per_minute / 60` tokens a second,
and each request takes one; an empty bucket answers how long until the next token (``Retry-After``).

The buckets are not shared: N API instances behind a balancer allow up to N times the limit. Sharing
them through the database or NATS would put a round trip on every request for a limit that is a guard
against runaway scripts, not a security boundary (a revoked or expired key is the boundary).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_BUCKETS = 10_000  # keys seen by one instance; beyond it, full (idle) buckets are forgotten


@dataclass(frozen=True)
class Limit:
    """`per_minute` sustained (0: unlimited), up to `burst` at once."""

    per_minute: float
    burst: int

    @property
    def unlimited(self) -> bool:
        """Whether this limit lets everything through."""
        return self.per_minute <= 0


class TokenBucket:
    """One bucket: `take` answers 0 when a token was taken, else the seconds until one is available."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, limit: Limit, now: float) -> None:
        self.rate = limit.per_minute / 60.0  # tokens a second
        self.burst = float(limit.burst)
        self.tokens = self.burst
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float) -> float:
        """Take one token (0.0), or the seconds to wait for one (nothing taken)."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled completely (forgetting it changes nothing)."""
        self._refill(now)
        return self.tokens >= self.burst


class RateLimiter:
    """Buckets by (key name, kind) for the limits of each kind (``read``, ``exec``)."""

    def __init__(self, limits: dict[str, Limit], clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def check(self, key: str, kind: str) -> int:
        """Take a token of `key`'s `kind` bucket: 0 if allowed, else whole seconds to wait (at least 1)."""
        limit = self.limits.get(kind)
        if limit is None or limit.unlimited:
            return 0
        now = self.clock()
        bucket = self._buckets.get((key, kind))
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_full(now)
            bucket = self._buckets[(key, kind)] = TokenBucket(limit, now)
        wait = bucket.take(now)
        return 0 if wait <= 0 else max(1, math.ceil(wait))

    def forget(self, key: str) -> None:
        """Drop `key`'s buckets (a revoked key)."""
        for kind in self.limits:
            self._buckets.pop((key, kind), None)

    def _forget_full(self, now: float) -> None:
        for ident in [i for i, b in self._buckets.items() if b.full(now)]:
            del self._buckets[ident]
