"""Prometheus metrics shared by the services on NATS (API, gateway, SSH worker; never the agent).

Each process exposes prometheus_client's default registry at ``/metrics`` (the API and the gateway on
their HTTP port, the SSH worker on ``WARLOCK_SSH_METRICS_PORT``). Labels are bounded: enum values (error
codes, paths, statuses, close codes from a fixed list, NATS roles), never a host, command, key or token.

Importing this module hooks the NATS reconnect counters into `shared.natsx.NatsLink` (`natsx.LINK_HOOKS`),
so every service that serves ``/metrics`` counts its NATS disconnects and reconnects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest

from shared import natsx
from shared.errors import ErrorCode

# Buckets (seconds) for command round trips: a fast agent exec is ~1 ms, an SSH one tens of ms, a
# command may run for minutes (its timeout).
EXEC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
DB_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)

NATS_EVENTS = Counter(
    "warlock_nats_events_total",
    "NATS connection events of this process: disconnected, reconnected, error (a failed attempt)",
    ["role", "event"],
)
ERRORS = Counter(
    "warlock_errors_total",
    "Typed error codes this process answered or recorded (shared.errors.ErrorCode values)",
    ["code"],
)
EXECS = Counter(
    "warlock_exec_total",
    "Commands delivered by the API's runner, by the path that answered (agent, ssh, none) and outcome "
    "status; the share with via=ssh is the fallback rate",
    ["via", "status"],
)
EXEC_SECONDS = Histogram(
    "warlock_exec_seconds",
    "Round trip of one command through the API's runner (request sent to outcome), by path",
    ["via"],
    buckets=EXEC_BUCKETS,
)
DB_SECONDS = Histogram(
    "warlock_db_query_seconds",
    "Database statement latency in the API: ORM statements (engine events) and the exec path's plain-SQL "
    "store calls, by kind",
    ["source", "op"],
    buckets=DB_BUCKETS,
)

_VIAS = ("agent", "ssh")
_OPS = ("select", "insert", "update", "delete")
KNOWN_CODES = {str(code.value) for code in ErrorCode}


def bounded(value: object, allowed: set[str] | tuple[str, ...], other: str = "other") -> str:
    """`value` as a label if it is one of `allowed`, else `other`: what clients send never grows a label."""
    text = "" if value is None else str(getattr(value, "value", value))
    return text if text in allowed else other


def count_error(code: object) -> None:
    """Count one typed error (an unknown code counts as ``other``)."""
    ERRORS.labels(bounded(code, KNOWN_CODES)).inc()


def observe_exec(via: object, status: object, seconds: float, error_code: object = None) -> None:
    """Record one command outcome of the API's runner: its path (None: nothing answered), status, time."""
    path = bounded(via, _VIAS, other="none")
    EXECS.labels(path, str(getattr(status, "value", status))).inc()
    EXEC_SECONDS.labels(path).observe(seconds)
    if error_code:
        count_error(error_code)


def statement_op(statement: str) -> str:
    """The kind of an SQL statement (``select``, ``insert``, ``update``, ``delete`` or ``other``)."""
    first = statement.lstrip().split(None, 1)[0].lower() if statement.strip() else ""
    return first if first in _OPS else "other"


def observe_engine(sync_engine: Any) -> None:
    """Time every statement `sync_engine` (an AsyncEngine's ``.sync_engine``) executes."""
    from sqlalchemy import event

    def before(conn: Any, _cursor: Any, _statement: str, _params: Any, context: Any, _many: bool) -> None:
        conn.info.setdefault("warlock_query_t0", []).append(time.perf_counter())

    def after(conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: bool) -> None:
        starts = conn.info.get("warlock_query_t0")
        if starts:
            DB_SECONDS.labels("orm", statement_op(statement)).observe(time.perf_counter() - starts.pop())

    def failed(exception_context: Any) -> None:
        conn = exception_context.connection
        if conn is not None and conn.info.get("warlock_query_t0"):
            conn.info["warlock_query_t0"].pop()

    event.listen(sync_engine, "before_cursor_execute", before)
    event.listen(sync_engine, "after_cursor_execute", after)
    event.listen(sync_engine, "handle_error", failed)


class timed:
    """``with timed(DB_SECONDS.labels(...)):`` observes the block's duration (also when it raises)."""

    def __init__(self, histogram: Any) -> None:
        self.histogram = histogram
        self.t0 = 0.0

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.histogram.observe(time.perf_counter() - self.t0)


def exposition() -> tuple[bytes, str]:
    """This process's metrics in the Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def _on_link_event(role: str, event: str) -> None:
    NATS_EVENTS.labels(bounded(role, ("api", "gateway", "ssh-worker")), event).inc()


def install_link_hook(hook: Callable[[str, str], None] = _on_link_event) -> None:
    """Have every `NatsLink` report its events to `hook` (done once, at import)."""
    if hook not in natsx.LINK_HOOKS:
        natsx.LINK_HOOKS.append(hook)


install_link_hook()
