"""Metric helpers: bounded labels, statement kinds, the gateway's /metrics route and its off switch."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway import metrics as gw_metrics
from shared import metrics


class FakeResponse:
    def __init__(self, status: int, body: str) -> None:
        self.status_code = status
        self.body = body.encode()  # as websockets' Response
        self.headers: dict[str, str] = {"Content-Type": "text/plain"}


class FakeConn:
    def respond(self, status: int, body: str) -> FakeResponse:
        return FakeResponse(int(status), body)


class FakeRequest:
    def __init__(self, path: str) -> None:
        self.path = path


def test_labels_are_bounded() -> None:
    assert metrics.bounded("timeout", metrics.KNOWN_CODES) == "timeout"
    assert metrics.bounded("host-1234", metrics.KNOWN_CODES) == "other"
    assert metrics.statement_op("  SELECT 1") == "select"
    assert metrics.statement_op("insert into x") == "insert"
    assert metrics.statement_op("BEGIN") == "other"
    assert metrics.statement_op("") == "other"


def test_unknown_error_codes_and_close_codes_share_one_label() -> None:
    before = metrics.ERRORS.labels("other")._value.get()
    metrics.count_error("made-up-code-1")
    metrics.count_error("made-up-code-2")
    assert metrics.ERRORS.labels("other")._value.get() == before + 2
    other = gw_metrics.DISCONNECTS.labels("other")._value.get()
    gw_metrics.session_ended(4999)
    gw_metrics.session_ended(1006)
    assert gw_metrics.DISCONNECTS.labels("other")._value.get() == other + 1
    assert gw_metrics.DISCONNECTS.labels("1006")._value.get() >= 1


async def test_gateway_route_answers_metrics_and_defers_the_rest() -> None:
    seen: list[str] = []

    async def gate(conn: Any, request: Any) -> Any:
        seen.append(request.path)
        return None  # an accepted upgrade

    route = gw_metrics.MetricsRoute(gate, enabled=True, agent_path="/agent")
    page = await route(FakeConn(), FakeRequest("/metrics?x=1"))  # type: ignore[arg-type]
    assert page is not None
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/plain; version=")
    names = {f.name for f in text_string_to_metric_families(bytes(page.body).decode())}
    assert {"warlock_gateway_sessions", "warlock_gateway_connects", "warlock_nats_events"} <= names
    assert seen == []
    upgrades = gw_metrics.UPGRADES.labels("101")._value.get()
    assert await route(FakeConn(), FakeRequest("/agent")) is None  # type: ignore[arg-type]
    assert gw_metrics.UPGRADES.labels("101")._value.get() == upgrades + 1
    off = gw_metrics.MetricsRoute(gate, enabled=False, agent_path="/agent")
    assert await off(FakeConn(), FakeRequest("/metrics")) is None  # type: ignore[arg-type]
    assert seen == ["/agent", "/metrics"]  # turned off: the gate answers it (404 for an unknown path)


def test_ssh_metrics_server_serves_then_stops_and_a_taken_port_is_one_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from services.fallback_ssh.metrics import MetricsServer
    from services.fallback_ssh.settings import FallbackSettings

    assert FallbackSettings.model_fields["metrics_port"].default is None  # off unless configured
    server = MetricsServer("127.0.0.1", 0)
    assert server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as page:
            names = {f.name for f in text_string_to_metric_families(page.read().decode())}
        assert {"warlock_ssh_exec", "warlock_ssh_in_flight", "warlock_errors"} <= names
        taken = MetricsServer("127.0.0.1", server.port)
        with caplog.at_level(logging.ERROR):
            assert not taken.start()
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
            f"metrics not served: cannot listen on 127.0.0.1:{server.port} (WARLOCK_SSH_METRICS_HOST/_PORT): "
            "Address already in use"
        ]
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError, match="Connection refused"):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)
