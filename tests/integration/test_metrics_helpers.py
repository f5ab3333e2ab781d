"""Metric helpers: bounded labels, statement kinds, the gateway's /metrics route and its off switch."""

from __future__ import annotations

from typing import Any

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
