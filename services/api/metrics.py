"""The API's operations side: ``GET /metrics``, the access log, and database timing.

``/metrics`` sits beside ``/healthz``, outside ``/api``: no API key, since Prometheus scrapers cannot easily
send one, and what it shows is counts and latencies with bounded labels (no host, command, key or token).
``WARLOCK_API_METRICS=false`` removes it (404) where the port is reachable by those who should not see
even that; otherwise keep the port on a network the scraper shares (as for ``/healthz``).

The access log (`AccessLog`, ``WARLOCK_API_ACCESS_LOG``) is one INFO line per request on
``services.api.access``: method, path (never the query string), status, duration, and the API key's
*name* once the edge verified it (never the key). With ``WARLOCK_LOG_FORMAT=json`` those are fields too.

Database latency: `shared.metrics.observe_engine` times every ORM statement; `TimedRunStore` times the exec
path's plain-SQL store calls (`services.api.store.runstore`), which bypass the engine.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.store.runstore import HostTarget, NewRun, RunStore
from shared.metrics import DB_SECONDS, exposition, timed

access_log = logging.getLogger("services.api.access")

router = APIRouter(tags=["health"])

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
HTTP_REQUESTS = Counter(
    "warlock_http_requests_total",
    "HTTP requests the API answered, by method and status",
    ["method", "status"],
)
HTTP_SECONDS = Histogram(
    "warlock_http_request_seconds",
    "HTTP request duration in the API (to the end of the response), by method",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    """This API process's metrics in the Prometheus text format (no API key; see the module docstring)."""
    body, content_type = exposition()
    return Response(body, media_type=content_type)


class AccessLog:
    """Outermost ASGI middleware: one access line and the HTTP metrics per request."""

    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, noting the status it sends; log and count once it is done (or raised)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # the edge leaves the verified key's name in it
        t0 = time.perf_counter()
        status = 500  # if the app raises before answering (JsonServerErrors then answers 500)

        async def noting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            seconds = time.perf_counter() - t0
            method = str(scope.get("method", "")).upper()
            label = method if method in _METHODS else "other"
            HTTP_REQUESTS.labels(label, str(status)).inc()
            HTTP_SECONDS.labels(label).observe(seconds)
            if self.enabled and access_log.isEnabledFor(logging.INFO):
                self._log(method, str(scope.get("path", ""))[:300], status, seconds, state.get("api_key"))

    @staticmethod
    def _log(method: str, path: str, status: int, seconds: float, key: Any) -> None:
        key_name = str(key) if key is not None else "-"
        duration_ms = round(seconds * 1000, 2)
        access_log.info(
            "%s %s %d %.2fms key=%s",
            method[:16],
            path,
            status,
            duration_ms,
            key_name,
            extra={
                "method": method[:16],
                "path": path,
                "status": status,
                "duration_ms": duration_ms,
                "key": key_name,
            },
        )


class TimedRunStore:
    """A `RunStore` whose calls are observed in ``warlock_db_query_seconds{source="runstore"}``."""

    def __init__(self, store: RunStore) -> None:
        self.store = store

    async def start(self, ref: str, run: NewRun) -> HostTarget | None:
        """As `RunStore.start`, timed."""
        with timed(DB_SECONDS.labels("runstore", "start")):
            return await self.store.start(ref, run)

    async def finish(self, command_id: str, values: dict[str, Any]) -> bool:
        """As `RunStore.finish`, timed."""
        with timed(DB_SECONDS.labels("runstore", "finish")):
            return await self.store.finish(command_id, values)

    async def route_ssh(self, command_id: str) -> bool:
        """As `RunStore.route_ssh`, timed."""
        with timed(DB_SECONDS.labels("runstore", "route_ssh")):
            return await self.store.route_ssh(command_id)

    async def close(self) -> None:
        """As `RunStore.close`."""
        await self.store.close()
