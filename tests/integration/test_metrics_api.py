"""The API's /metrics (no key; off with WARLOCK_API_METRICS=false) and its access log, in-process, on a
real nats-server and both databases."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.db import api_settings, running_api
from tests.support.natsserver import NatsServer


def orm_statements(text: str) -> float:
    """The number of ORM statements timed so far (sum over kinds)."""
    count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "warlock_db_query_seconds_count" and sample.labels.get("source") == "orm":
                count += sample.value
    return count


async def test_metrics_need_no_key_and_parse(tmp_path: Path, nats_server: NatsServer, database: str) -> None:
    async with running_api(api_settings(tmp_path, nats_server.url, database)) as api:
        first = await api.client.get("/metrics")
        assert first.status_code == 200
        names = {family.name for family in text_string_to_metric_families(first.text)}
        assert {
            "warlock_exec",
            "warlock_db_query_seconds",
            "warlock_http_requests",
            "warlock_nats_events",
        } <= names
        listed = await api.client.get("/api/hosts", headers={"Authorization": f"Bearer {api.key}"})
        assert listed.status_code == 200
        second = await api.client.get("/metrics")
        assert orm_statements(second.text) > orm_statements(first.text)  # the key check, the host list
        assert "/metrics" not in (await api.client.get("/openapi.json")).json()["paths"]  # not an API route


async def test_metrics_can_be_turned_off(tmp_path: Path, nats_server: NatsServer, database: str) -> None:
    async with running_api(api_settings(tmp_path, nats_server.url, database, metrics=False)) as api:
        answer = await api.client.get("/metrics")
        assert answer.status_code == 404
        assert answer.headers["content-type"] == "application/json"


async def test_access_log_has_key_name_path_status_never_key_or_query(
    tmp_path: Path, nats_server: NatsServer, database: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.api.access")
    async with running_api(api_settings(tmp_path, nats_server.url, database)) as api:
        ok = await api.client.get(
            "/api/hosts?token=query-secret", headers={"Authorization": f"Bearer {api.key}"}
        )
        assert ok.status_code == 200
        refused = await api.client.get("/api/hosts", headers={"Authorization": "Bearer wrong-key-secret"})
        assert refused.status_code == 401
        missing = await api.client.get("/no/such/path")
        assert missing.status_code == 404
    lines = [r for r in caplog.records if r.name == "services.api.access"]
    assert [(r.method, r.path, r.status, r.key) for r in lines] == [  # type: ignore[attr-defined]
        ("GET", "/api/hosts", 200, "bootstrap"),
        ("GET", "/api/hosts", 401, "-"),
        ("GET", "/no/such/path", 404, "-"),
    ]
    assert lines[0].getMessage().startswith("GET /api/hosts 200 ")
    assert lines[0].getMessage().endswith(" key=bootstrap")
    text = "\n".join(r.getMessage() + str(r.__dict__) for r in lines)
    assert "query-secret" not in text
    assert "wrong-key-secret" not in text
    assert api.key not in text


async def test_access_log_can_be_turned_off(
    tmp_path: Path, nats_server: NatsServer, database: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.api.access")
    settings = api_settings(tmp_path, nats_server.url, database, access_log=False)
    async with running_api(settings) as api:
        assert (await api.client.get("/healthz")).status_code == 200
    assert not [r for r in caplog.records if r.name == "services.api.access"]
