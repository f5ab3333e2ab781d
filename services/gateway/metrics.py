"""The gateway's ``GET /metrics`` (Prometheus text) and its session metrics.

``/metrics`` is answered on the gateway's own port, beside ``/healthz``, by the ``process_request`` hook
(`MetricsRoute` wraps `services.gateway.upgrade.UpgradeGate`): no token, since a scraper has none, and
nothing in it names a host, session or token (labels are close codes from a fixed list, error codes and
HTTP statuses). ``WARLOCK_GATEWAY_METRICS=false`` turns it off (404, as any unknown path).

    warlock_gateway_sessions              agent sessions open now (every gateway of this process)
    warlock_gateway_connects_total        sessions started (Welcome sent)
    warlock_gateway_disconnects_total     sessions ended, by close code (``other`` outside CloseCode)
    warlock_gateway_upgrades_total        upgrade requests on /agent by answer (101 accepted, 401, 503...)
    warlock_errors_total{code}            typed errors the gateway answered (shared.metrics)
    warlock_nats_events_total             NATS disconnects and reconnects (shared.metrics)
"""

from __future__ import annotations

import http
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from shared.errors import CloseCode
from shared.metrics import exposition

METRICS_PATH = "/metrics"
_CLOSE_CODES = {str(int(c)) for c in CloseCode} | {"1005", "1006"}  # + no status / abnormal closure

CONNECTS = Counter("warlock_gateway_connects_total", "Agent sessions started (Welcome sent)")
DISCONNECTS = Counter(
    "warlock_gateway_disconnects_total",
    "Agent sessions ended, by WebSocket close code (none: no code; other: outside the known codes)",
    ["code"],
)
UPGRADES = Counter(
    "warlock_gateway_upgrades_total",
    "Requests on the agent path, by answer: 101 (upgrade accepted) or the refusal's HTTP status",
    ["status"],
)


class _Sessions(Collector):
    """``warlock_gateway_sessions``: the open sessions of every live bridge in this process."""

    def __init__(self) -> None:
        self.bridges: weakref.WeakSet[Any] = weakref.WeakSet()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """One gauge: the sum of the bridges' session counts."""
        total = sum(len(bridge.sessions) for bridge in list(self.bridges))
        yield GaugeMetricFamily("warlock_gateway_sessions", "Agent sessions open now", value=total)


SESSIONS = _Sessions()
REGISTRY.register(SESSIONS)


def watch_sessions(bridge: object) -> None:
    """Count `bridge`'s sessions (``bridge.sessions``, a dict) in ``warlock_gateway_sessions``."""
    SESSIONS.bridges.add(bridge)


def session_started() -> None:
    """One more session started."""
    CONNECTS.inc()


def session_ended(code: int | None) -> None:
    """One session ended with close code `code` (None: no close code known)."""
    label = "none" if code is None else str(code) if str(code) in _CLOSE_CODES else "other"
    DISCONNECTS.labels(label).inc()


Gate = Callable[[ServerConnection, Request], Awaitable[Response | None]]


class MetricsRoute:
    """A ``process_request`` hook: ``GET /metrics`` answered here (when `enabled`), the rest by `gate`."""

    def __init__(self, gate: Gate, enabled: bool = True, agent_path: str = "/agent") -> None:
        self.gate = gate
        self.enabled = enabled
        self.agent_path = agent_path

    async def __call__(self, conn: ServerConnection, request: Request) -> Response | None:
        """The metrics, or what `gate` answers (upgrades on the agent path counted by outcome)."""
        path = urlsplit(request.path).path
        if self.enabled and path == METRICS_PATH:
            body, content_type = exposition()
            page = conn.respond(http.HTTPStatus.OK, body.decode())
            del page.headers["Content-Type"]
            page.headers["Content-Type"] = content_type
            return page
        answer = await self.gate(conn, request)
        if path == self.agent_path:
            UPGRADES.labels("101" if answer is None else str(answer.status_code)).inc()
        return answer
