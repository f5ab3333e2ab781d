"""``GET /api/fleet`` on real PostgreSQL and SQLite (an in-process API, a real nats-server): one row per
host with presence (agent / ssh / offline), agent session and the latest sample; the same three queries
for 3 hosts or 53; label filter, scope filter, 401 and 422."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert, update

from services.api.store.models import AgentConnection, AgentStatus, Host, MetricSample
from tests.support.db import api_settings, running_api
from tests.support.fleet import provision
from tests.support.natsserver import NatsServer

HOSTS = {"web1": {"role": "web"}, "web2": {"role": "web", "tier": "edge"}, "db1": {"role": "db"}}


def _sample(
    host: str, at: float, cpu: float, disk: float | None = 40.0, rtt_ms: float | None = None
) -> dict[str, Any]:
    return {
        "rtt_ms": rtt_ms,
        "host_id": host,
        "at": at,
        "cpu": cpu,
        "load_1": 0.1,
        "mem": 50.0,
        "swap": 0.0,
        "disk": disk,
        "net_rx": 0.0,
        "net_tx": 0.0,
    }


async def test_fleet_rows_presence_latest_sample_filters_and_query_count(
    tmp_path: Path, nats_server: NatsServer, database: str
) -> None:
    async with running_api(api_settings(tmp_path, nats_server.url, database)) as api:
        http = api.client
        for n, (host, labels) in enumerate(HOSTS.items()):
            body = {"id": host, "address": f"10.0.0.{n + 1}", "ssh_check": False, "labels": labels}
            assert (await http.post("/api/hosts", json=body, headers=api.auth)).status_code == 201
        now = time.time()
        connected_at = datetime.fromtimestamp(now - 100, UTC)
        async with api.state.engine.begin() as conn:
            await conn.execute(
                update(Host.__table__).where(Host.__table__.c.id == "db1").values(host_key="ssh-ed25519 AAAA")  # type: ignore[attr-defined]
            )
            await conn.execute(
                insert(AgentConnection.__table__),  # type: ignore[attr-defined]
                [
                    {
                        "host_id": "web2",
                        "status": str(AgentStatus.CONNECTED),
                        "agent_version": "9.9.9",
                        "gateway_id": "gw-7",
                        "connected_at": connected_at,
                        "last_ping": connected_at,
                        "updated_at": connected_at,
                    },
                    {  # an agent that was connected once: offline now, its version remembered
                        "host_id": "web1",
                        "status": str(AgentStatus.DISCONNECTED),
                        "agent_version": "1.0.0",
                        "gateway_id": "gw-1",
                        "connected_at": None,
                        "last_ping": None,
                        "updated_at": connected_at,
                    },
                ],
            )
            await conn.execute(
                insert(MetricSample.__table__),  # type: ignore[attr-defined]
                [
                    _sample("web1", now - 90, 99.0),
                    _sample("web1", now - 30, 20.0, disk=None),
                    _sample("web1", now - 60, 10.0),
                    _sample("web2", now - 5, 5.0, rtt_ms=1.25),
                ],
            )

        got = await http.get("/api/fleet", headers=api.auth)
        assert got.status_code == 200, got.text
        rows = {r["id"]: r for r in got.json()}
        assert list(rows) == ["db1", "web1", "web2"]
        assert {h: r["presence"] for h, r in rows.items()} == {
            "db1": "ssh",
            "web1": "offline",
            "web2": "agent",
        }
        assert rows["db1"]["ssh_fallback"] is True
        assert rows["web1"]["ssh_fallback"] is False
        web1, web2 = rows["web1"], rows["web2"]
        assert (web1["cpu"], web1["mem"], web1["disk"]) == (20.0, 50.0, None)  # the latest, not the last in
        assert abs(datetime.fromisoformat(web1["sampled_at"]).timestamp() - (now - 30)) < 1e-3
        assert (web1["agent_version"], web1["gateway_id"], web1["connected_at"]) == ("1.0.0", None, None)
        assert (web2["agent_version"], web2["gateway_id"]) == ("9.9.9", "gw-7")
        assert datetime.fromisoformat(web2["connected_at"]) == connected_at
        assert (web2["cpu"], web2["disk"]) == (5.0, 40.0)
        assert rows["db1"]["cpu"] is None
        assert rows["db1"]["sampled_at"] is None
        assert {h: r["rtt_ms"] for h, r in rows.items()} == {"db1": None, "web1": None, "web2": 1.25}
        assert web1["labels"] == {"role": "web"}
        assert web1["address"] == "10.0.0.1"

        # three queries on the fleet's tables whatever the number of hosts
        statements: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if any(t in statement for t in ("FROM host", "FROM agent_connection", "metric_sample")):
                statements.append(statement)

        engine = api.state.engine.sync_engine
        event.listen(engine, "before_cursor_execute", count)
        assert len((await http.get("/api/fleet", headers=api.auth)).json()) == 3
        small = len(statements)
        await provision(database, 50)
        statements.clear()
        assert len((await http.get("/api/fleet", headers=api.auth)).json()) == 53
        event.remove(engine, "before_cursor_execute", count)
        assert small == len(statements) == 3, statements

        # label filters as GET /api/hosts has them; a scoped key sees its hosts only
        web = await http.get("/api/fleet", params={"label": "role=web"}, headers=api.auth)
        assert [r["id"] for r in web.json()] == ["web1", "web2"]
        both = await http.get(
            "/api/fleet", params=[("label", "role=web"), ("label", "tier")], headers=api.auth
        )
        assert [r["id"] for r in both.json()] == ["web2"]
        made = await http.post(
            "/api/keys", json={"name": "db-read", "role": "read", "scope": {"role": "db"}}, headers=api.auth
        )
        assert made.status_code == 201, made.text
        scoped = await http.get("/api/fleet", headers={"Authorization": f"Bearer {made.json()['key']}"})
        assert [r["id"] for r in scoped.json()] == ["db1"]

        # bad input
        assert (await http.get("/api/fleet")).status_code == 401
        bad = await http.get("/api/fleet", params={"label": "=web"}, headers=api.auth)
        assert bad.status_code == 422, bad.text
        assert bad.json()["detail"][0]["loc"] == ["query", "label"]
