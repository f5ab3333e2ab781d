"""``GET /agent/<name>.whl`` against the in-process API (real NATS and SQLite): a wrong name costs nothing,
and a failed build is not re-run for every anonymous request."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.api.fleet.wheel import WheelSource
from shared.version import wheel_name
from tests.support.db import RunningApi, api_settings, running_api
from tests.support.natsserver import NatsServer
from tests.unit.test_api_wheel import broken_tree

BUILDING = "building the agent wheel from"


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[RunningApi]:
    """The API with its default wheel source (built from this tree on first use) under tmp_path/wheels."""
    settings = api_settings(
        tmp_path, nats_server.url, f"sqlite+aiosqlite:///{tmp_path / 'api.db'}", wheel_dir=tmp_path / "wheels"
    )
    async with running_api(settings) as running:
        yield running


async def test_wrong_wheel_name_is_404_without_a_build(
    api: RunningApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Names other than warlock_agent.whl and this version's wheel are 404 (JSON, naming the served file)
    before anything is read or built: no pip run, nothing written."""
    other_version = wheel_name(version="9.9.9")
    with caplog.at_level(logging.INFO):
        for name in ("evil.whl", other_version, "x" * 300 + ".whl", "install.sh.whl"):
            response = await api.client.get(f"/agent/{name}")
            assert response.status_code == 404, (name, response.text)
            assert wheel_name() in response.json()["detail"]
    assert BUILDING not in caplog.text
    assert not (tmp_path / "wheels").exists()


async def test_failed_build_is_answered_from_memory(
    api: RunningApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a failed build, further anonymous requests get 503 JSON without pip running again."""
    api.state.lifecycle.wheels = WheelSource(None, tmp_path / "wheels", root=broken_tree(tmp_path))
    with caplog.at_level(logging.INFO):
        answers = [await api.client.get("/agent/warlock_agent.whl") for _ in range(3)]
    assert [a.status_code for a in answers] == [503, 503, 503]
    assert "WARLOCK_API_AGENT_WHEEL" in answers[0].json()["detail"]
    assert "not retried" in answers[2].json()["detail"]
    assert caplog.text.count(BUILDING) == 1
