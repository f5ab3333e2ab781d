"""The gateway ⇄ agent round trip reaches the metrics history: real API (SQLite), gateway and agent.

The gateway stamps each keepalive ping's id with its send time; the agent's pong gives the session's
``rtt_ms``, which the next metrics event carries (`MetricsEvent.agent_rtt_ms`) into ``metric_sample`` and
``GET /api/hosts/{host}/metrics``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.support.db import fresh_database
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e


async def test_the_keepalive_round_trip_is_kept_with_the_samples(stack: Stack, tmp_path: Path) -> None:
    async with fresh_database("sqlite", tmp_path) as db_url:
        api = stack.start_api(db_url)
        gw = stack.start_gateway(ping_interval="0.2")
        async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=30) as http:
            added = await http.post(
                "/api/hosts", json={"id": "box", "address": "127.0.0.1", "ssh_check": False}
            )
            assert added.status_code == 201, added.text
            await stack.start_known_agent(api, "box", "box", [gw.url], metrics_interval=0.3)
            rtts: list[float] = []
            for _ in range(100):
                answer = await http.get("/api/hosts/box/metrics", params={"step": 30})
                assert answer.status_code == 200, answer.text
                rtts = [p["rtt_ms"] for p in answer.json()["points"] if p["rtt_ms"] is not None]
                if rtts:
                    break
                await asyncio.sleep(0.1)
            assert rtts, "no sample carried the gateway ⇄ agent round trip"
            assert all(0 <= rtt < 1000 for rtt in rtts), rtts  # loopback: milliseconds at most
