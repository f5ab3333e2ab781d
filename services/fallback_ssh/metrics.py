"""The SSH worker's ``/metrics``: a small HTTP server of its own (it has no other), off by default.

``WARLOCK_SSH_METRICS_PORT`` (unset: no server; 0: a free port, logged) on ``WARLOCK_SSH_METRICS_HOST``
(default 127.0.0.1) serves prometheus_client's default registry in a thread: ``GET /metrics``. Nothing in it
names a host, command or key:

    warlock_ssh_exec_total{outcome}     SSH execs answered: ok (exit 0), failed (other exit), timed_out,
                                        cancelled, error (a typed error reply)
    warlock_ssh_exec_seconds            their duration (request decoded to answer ready)
    warlock_ssh_in_flight               requests being handled now
    warlock_errors_total{code}          typed error replies of every kind (shared.metrics)
    warlock_nats_events_total           NATS disconnects and reconnects (shared.metrics)
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.metrics import EXEC_BUCKETS

log = logging.getLogger(__name__)

SSH_EXECS = Counter("warlock_ssh_exec_total", "SSH execs the worker answered, by outcome", ["outcome"])
SSH_EXEC_SECONDS = Histogram(
    "warlock_ssh_exec_seconds", "Duration of the SSH execs the worker answered", buckets=EXEC_BUCKETS
)


class _InFlight(Collector):
    """``warlock_ssh_in_flight``: requests being handled by the live workers of this process."""

    def __init__(self) -> None:
        self.workers: weakref.WeakSet[Any] = weakref.WeakSet()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """One gauge: the sum of the workers' ``in_flight``."""
        total = sum(int(worker.in_flight) for worker in list(self.workers))
        yield GaugeMetricFamily("warlock_ssh_in_flight", "SSH worker requests being handled now", value=total)


IN_FLIGHT = _InFlight()
REGISTRY.register(IN_FLIGHT)


def watch_worker(worker: object) -> None:
    """Count `worker`'s ``in_flight`` in ``warlock_ssh_in_flight``."""
    IN_FLIGHT.workers.add(worker)


def observe_exec(outcome: str, seconds: float) -> None:
    """One SSH exec answered with `outcome` after `seconds`."""
    SSH_EXECS.labels(outcome).inc()
    SSH_EXEC_SECONDS.observe(seconds)


class MetricsServer:
    """prometheus_client's HTTP server on (`host`, `port`), in a daemon thread, until `stop`."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Listen; False (logged, one line) when the address cannot be bound: the worker runs on without."""
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host)
        except OSError as exc:
            log.error(
                "metrics not served: cannot listen on %s:%d (WARLOCK_SSH_METRICS_HOST/_PORT): %s",
                self.host,
                self.port,
                exc.strerror or exc,
            )
            return False
        self.port = int(self._server.server_address[1])
        log.info("ssh worker metrics on http://%s:%d/metrics", self.host, self.port)
        return True

    def stop(self) -> None:
        """Stop listening and join the thread."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
