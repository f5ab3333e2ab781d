"""Per-key token buckets (`services.api.http.ratelimit`), label scopes and the CLI's expiry parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.api.errors import Conflict
from services.api.http.auth import in_scope
from services.api.http.ratelimit import MAX_BUCKETS, Limit, RateLimiter, TokenBucket
from services.ctl.admin import parse_expiry, parse_scope


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_the_burst_then_refills_at_the_rate() -> None:
    """60/min, burst 3: three at once, the fourth waits 1 s; after 1 s exactly one more."""
    clock = Clock()
    limiter = RateLimiter({"exec": Limit(60, 3)}, clock)
    assert [limiter.check("k", "exec") for _ in range(3)] == [0, 0, 0]
    assert limiter.check("k", "exec") == 1
    clock.now += 0.5
    assert limiter.check("k", "exec") == 1  # half a token: ceil(0.5 s) → 1
    clock.now += 0.5
    assert limiter.check("k", "exec") == 0
    assert limiter.check("k", "exec") == 1
    clock.now += 3600
    assert [limiter.check("k", "exec") for _ in range(4)] == [0, 0, 0, 1]  # refill stops at the burst


def test_retry_after_is_whole_seconds_until_the_next_token() -> None:
    """6/min: a token every 10 s; an empty bucket says 10, then fewer as time passes."""
    clock = Clock()
    limiter = RateLimiter({"read": Limit(6, 1)}, clock)
    assert limiter.check("k", "read") == 0
    assert limiter.check("k", "read") == 10
    clock.now += 7.5
    assert limiter.check("k", "read") == 3


def test_keys_and_kinds_have_their_own_buckets_and_zero_is_unlimited() -> None:
    """One key's empty bucket does not limit another key or the other kind; per_minute 0 never limits."""
    clock = Clock()
    limiter = RateLimiter({"exec": Limit(60, 1), "read": Limit(0, 1)}, clock)
    assert limiter.check("a", "exec") == 0
    assert limiter.check("a", "exec") > 0
    assert limiter.check("b", "exec") == 0
    assert all(limiter.check("a", "read") == 0 for _ in range(1000))
    limiter.forget("a")
    assert limiter.check("a", "exec") == 0  # a forgotten key starts full


def test_idle_buckets_are_forgotten_past_the_bound() -> None:
    """Past MAX_BUCKETS keys, full (idle) buckets are dropped; a drained one is kept."""
    clock = Clock()
    limiter = RateLimiter({"exec": Limit(60, 1)}, clock)
    limiter.check("drained", "exec")
    for n in range(MAX_BUCKETS - 1):
        limiter.check(f"k{n}", "exec")
    clock.now += 5  # everyone refills (burst 1) ...
    limiter.check("drained", "exec")  # ... and this one is drained again
    limiter.check("new", "exec")
    assert len(limiter._buckets) == 2
    assert limiter.check("drained", "exec") > 0


def test_bucket_never_exceeds_its_rate_over_time() -> None:
    """Hammered every 10 ms for 60 s at 120/min, burst 10: at most 10 + 120 requests pass."""
    clock = Clock()
    bucket = TokenBucket(Limit(120, 10), clock.now)
    passed = 0
    for _ in range(6000):
        clock.now += 0.01
        passed += bucket.take(clock.now) == 0
    assert 125 <= passed <= 130


def test_scope_matches_every_label_pair() -> None:
    assert in_scope(None, {"role": "db"})
    assert in_scope({"role": "web"}, {"role": "web", "dc": "eu"})
    assert not in_scope({"role": "web"}, {"role": "db"})
    assert not in_scope({"role": "web", "dc": "eu"}, {"role": "web"})
    assert not in_scope({"role": "web"}, None)
    assert not in_scope({"role": ""}, {})  # an empty value must be present, not merely absent


def test_cli_expiry_and_scope_parsing() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_expiry("3600", now) == now + timedelta(hours=1)
    assert parse_expiry("90m", now) == now + timedelta(minutes=90)
    assert parse_expiry("30d", now) == now + timedelta(days=30)
    assert parse_expiry("2w", now) == now + timedelta(weeks=2)
    assert parse_expiry("2031-01-01T00:00:00Z", now) == datetime(2031, 1, 1, tzinfo=UTC)
    assert parse_expiry("2031-01-01T02:00:00+02:00", now) == datetime(2031, 1, 1, tzinfo=UTC)
    for bad in ("0", "-5", "5y", "soon", "2031-01-01T00:00:00", "2029-01-01T00:00:00Z", "99999d"):
        with pytest.raises(Conflict):
            parse_expiry(bad, now)
    assert parse_scope([]) is None
    assert parse_scope(["role=web", "dc=eu", "empty="]) == {"role": "web", "dc": "eu", "empty": ""}
    for bad_scope in (["role"], ["=web"], ["role=a", "role=b"], [f"k{n}=v" for n in range(17)]):
        with pytest.raises(Conflict):
            parse_scope(bad_scope)
