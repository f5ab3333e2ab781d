"""Metrics history, on real PostgreSQL and SQLite and a real nats-server: samples published as gateways
publish them are all stored, in far fewer statements than samples, with last_ping set in the same batches;
a database outage loses none; the retention job folds old samples into 5-minute averages and deletes what
is past retention; ``GET /api/hosts/{host}/metrics`` serves ranges and steps over both, with its 422s, 404
and 403."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from sqlalchemy import event, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

from services.api.fleet.metrics_history import maintain_once
from services.api.store.db import make_engine, sessionmaker
from services.api.store.metrics import LOCK_ID, history
from services.api.store.models import AgentConnection, MetricRollup, MetricSample
from shared import subjects
from shared.protocol import DiskUsage, MetricsEvent, MetricsSample, encode
from tests.integration.test_presence_batch import TcpProxy
from tests.support.db import RunningApi, api_settings, eventually, fresh_database, running_api
from tests.support.fleet import host_ids, provision
from tests.support.natsserver import NatsServer

DAY = 86400.0


def sample(
    host: str, at: float, cpu: float = 10.0, rx: int = 1000, disks: tuple[float, ...] = (40.0,)
) -> bytes:
    values = {
        "timestamp": at,
        "cpu_percent": cpu,
        "load_1": cpu / 10,
        "load_5": 0.0,
        "load_15": 0.0,
        "memory_total": 1000,
        "memory_available": 500,
        "memory_used": 500,
        "memory_percent": 50.0,
        "swap_total": 0,
        "swap_used": 0,
        "swap_percent": 0.0,
        "disks": [
            DiskUsage(mount=f"/m{i}", total=100, used=int(p), free=100 - int(p), percent=p)
            for i, p in enumerate(disks)
        ],
        "net_bytes_sent": rx // 2,
        "net_bytes_recv": rx,
        "net_packets_sent": 0,
        "net_packets_recv": 0,
        "uptime_s": 100.0,
        "process_count": 10,
    }
    s = MetricsSample.model_validate(values)
    return encode(MetricsEvent(host_id=host, gateway_id="gw-1", sample=s))


@pytest.fixture
async def gw(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A client with the gateway identity: publishes metrics."""
    client = await nats_server.connect("gateway")
    yield client
    await client.drain()


async def count_rows(engine: AsyncEngine, model: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(model))).scalar_one())


async def test_samples_are_stored_in_batches_with_last_ping(
    tmp_path: Path, nats_server: NatsServer, gw: NATS, database: str
) -> None:
    """300 hosts × 10 samples: every one stored, in a handful of INSERTs; each host's last_ping set, by one
    UPDATE per batch (not one per sample)."""
    hosts = host_ids(300)
    async with running_api(api_settings(tmp_path, nats_server.url, database)) as api:
        await provision(database, len(hosts))
        statements: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if "metric_sample" in statement or "agent_connection" in statement:
                statements.append(statement.split()[0].upper())

        event.listen(api.state.engine.sync_engine, "before_cursor_execute", count)
        now = time.time()
        for i in range(10):
            for host in hosts:
                await gw.publish(subjects.metrics(host), sample(host, now - 270 + i * 30))
        await gw.flush()

        async def all_stored() -> bool:
            return await count_rows(api.state.engine, MetricSample) == 3000

        await eventually(all_stored, timeout=30)
        event.remove(api.state.engine.sync_engine, "before_cursor_execute", count)
        inserts, updates = statements.count("INSERT"), statements.count("UPDATE")
        assert 1 <= inserts <= 30, statements  # 3,000 samples
        assert 1 <= updates <= 10, statements
        async with api.state.engine.connect() as conn:
            pings = (await conn.execute(select(AgentConnection.last_ping))).scalars().all()  # type: ignore[call-overload]
        assert len(pings) == 300
        assert all(p is not None for p in pings)


async def test_a_database_outage_loses_no_sample(
    tmp_path: Path, nats_server: NatsServer, gw: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL behind a proxy: 1,000 samples, the database goes away while 2,000 more arrive, 3 s later
    it is back: all 3,000 are stored."""
    proxy = TcpProxy()
    await proxy.start()
    hosts = host_ids(100)
    async with fresh_database("postgresql", tmp_path) as direct:
        via_proxy = make_url(direct).set(port=proxy.port).render_as_string(hide_password=False)
        engine = make_engine(direct)
        try:
            async with running_api(api_settings(tmp_path, nats_server.url, via_proxy)):
                await provision(direct, len(hosts))
                now = time.time()
                for i in range(10):
                    for host in hosts:
                        await gw.publish(subjects.metrics(host), sample(host, now - 200 + i))
                await gw.flush()

                async def some_stored() -> bool:
                    return await count_rows(engine, MetricSample) > 0

                await eventually(some_stored, timeout=20)
                await proxy.cut()
                for i in range(10, 30):
                    for host in hosts:
                        await gw.publish(subjects.metrics(host), sample(host, now - 200 + i))
                await gw.flush()
                await _sleep(3)
                assert await count_rows(engine, MetricSample) < 3000
                await proxy.restore()

                async def all_stored() -> bool:
                    return await count_rows(engine, MetricSample) == 3000

                await eventually(all_stored, timeout=40)
                assert "metrics: database unavailable" in caplog.text
                assert "database back after" in caplog.text
        finally:
            await engine.dispose()
            await proxy.close()


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def raw(host: str, at: float, cpu: float, rx: float = 0.0, disk: float | None = 50.0) -> dict[str, Any]:
    return {
        "host_id": host,
        "at": at,
        "cpu": cpu,
        "load_1": cpu / 10,
        "mem": 20.0,
        "swap": 0.0,
        "disk": disk,
        "net_rx": rx,
        "net_tx": rx / 2,
    }


async def insert_rows(engine: AsyncEngine, model: Any, rows: list[dict[str, Any]]) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(model.__table__), rows)


async def test_retention_folds_old_samples_into_averages_and_deletes_expired(
    tmp_path: Path, database: str
) -> None:
    """Samples older than the raw retention become 5-minute averages (and are deleted); newer ones stay
    raw; buckets past the rollup retention are deleted; a late sample of a folded bucket is merged by
    weight; the history reads both tables."""
    engine = make_engine(database)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(SQLModel.metadata.create_all)
        now = 1_800_000_000.0  # a multiple of 300
        old = now - 2 * DAY  # past the raw retention (1 day)
        rows = [raw("a", old + i * 30, cpu=float(i)) for i in range(12)]  # 10 in [old, old+300), 2 after
        rows += [raw("b", old + 5, cpu=80.0, disk=None)]
        rows += [raw("a", now - 60, cpu=99.0)]  # recent: stays raw
        await insert_rows(engine, MetricSample, rows)
        expired = {**raw("a", now - 40 * DAY, 1.0), "samples": 10}
        kept_rollup = {**raw("a", now - 20 * DAY, 1.0), "samples": 10}
        await insert_rows(engine, MetricRollup, [expired, kept_rollup])

        done = await maintain_once(engine, DAY, 30 * DAY, now=now)
        assert done is not None
        assert (done.folded, done.buckets, done.expired) == (13, 3, 1)
        assert await rollup_rows(engine) == [
            ("a", now - 20 * DAY, 10, 1.0, 50.0),
            ("a", old, 10, 4.5, 50.0),
            ("a", old + 300, 2, 10.5, 50.0),
            ("b", old, 1, 80.0, None),
        ]
        async with engine.connect() as conn:
            kept = (await conn.execute(select(MetricSample.host_id, MetricSample.at))).all()  # type: ignore[call-overload]
        assert [tuple(r) for r in kept] == [("a", now - 60)]

        # a late sample of a folded bucket: merged by weight (10 samples at 4.5 and one at 15.5 → 5.5)
        await insert_rows(engine, MetricSample, [raw("a", old + 100, cpu=15.5)])
        assert await maintain_once(engine, DAY, 30 * DAY, now=now) is not None
        assert (await rollup_rows(engine))[1] == ("a", old, 11, 5.5, 50.0)
        again = await maintain_once(engine, DAY, 30 * DAY, now=now)
        assert again is not None
        assert (again.folded, again.expired) == (0, 0)

        sessions = sessionmaker(engine)
        async with sessions() as session:
            points = await history(session, "a", old, now, 600)
        assert [(p.at, p.samples, p.values["cpu"]) for p in points] == [
            (old, 13, (11 * 5.5 + 2 * 10.5) / 13),
            (now - 600, 1, 99.0),
        ]
    finally:
        await engine.dispose()


async def rollup_rows(engine: AsyncEngine) -> list[tuple[Any, ...]]:
    columns = (
        MetricRollup.host_id,
        MetricRollup.at,
        MetricRollup.samples,
        MetricRollup.cpu,
        MetricRollup.disk,
    )
    async with engine.connect() as conn:
        rows = await conn.execute(select(*columns).order_by(MetricRollup.host_id, MetricRollup.at))  # type: ignore[call-overload]
        return [tuple(r) for r in rows.all()]


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer, database: str) -> AsyncIterator[RunningApi]:
    """The API with hosts web1 (role=web) and db1 (role=db), added without SSH check."""
    async with running_api(api_settings(tmp_path, nats_server.url, database)) as running:
        for n, (host, role) in enumerate((("web1", "web"), ("db1", "db"))):
            body = {"id": host, "address": f"10.0.0.{n + 1}", "ssh_check": False, "labels": {"role": role}}
            response = await running.client.post("/api/hosts", json=body, headers=running.auth)
            assert response.status_code == 201, response.text
        yield running


async def test_the_endpoint_serves_ranges_and_steps(api: RunningApi) -> None:
    """Default range (the last hour), explicit ranges over raw and downsampled data, steps, network rates."""
    now = time.time()
    base = (now // 600) * 600 - 3000  # five 10-minute buckets ago, aligned
    rows = [raw("web1", base + i * 30, cpu=float(i % 2 * 10), rx=1000.0 * i) for i in range(40)]  # 20 min
    await insert_rows(api.state.engine, MetricSample, rows)
    old = (now // 600) * 600 - 3 * DAY  # aligned to the 600 s step below
    rollups = [{**raw("web1", old + i * 300, cpu=30.0 + i), "samples": 10} for i in range(4)]
    await insert_rows(api.state.engine, MetricRollup, rollups)
    url = "/api/hosts/web1/metrics"

    got = await api.client.get(url, headers=api.auth)
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["host_id"] == "web1"
    assert body["step"] == 30  # an hour / 360 points, rounded up to a multiple of 30
    assert len(body["points"]) == 40
    assert all(p["samples"] == 1 for p in body["points"])

    params: dict[str, str | int] = {"since": iso(base), "until": iso(base + 1200), "step": 600}
    body = (await api.client.get(url, params=params, headers=api.auth)).json()
    assert [p["samples"] for p in body["points"]] == [20, 20]
    first, second = body["points"]
    assert first["cpu"] == pytest.approx(5.0)
    assert first["mem"] == pytest.approx(20.0)
    assert first["disk"] == pytest.approx(50.0)
    assert first["net_rx"] is None  # no previous bucket
    assert second["net_rx"] == pytest.approx(1000.0 / 30)  # 1,000 bytes every 30 s
    assert second["net_tx"] == pytest.approx(500.0 / 30)

    params = {"since": iso(old), "until": iso(old + 1200), "step": 600}
    body = (await api.client.get(url, params=params, headers=api.auth)).json()
    assert [(p["samples"], p["cpu"]) for p in body["points"]] == [(20, 30.5), (20, 32.5)]

    params = {"since": iso(old - DAY), "until": iso(now + 60), "step": 86400}  # both tables, one request
    body = (await api.client.get(url, params=params, headers=api.auth)).json()
    assert sum(p["samples"] for p in body["points"]) == 80

    assert (await api.client.get("/api/hosts/db1/metrics", headers=api.auth)).json()["points"] == []


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


async def test_the_endpoint_refuses_bad_params_unknown_hosts_and_out_of_scope_keys(
    api: RunningApi,
) -> None:
    url = "/api/hosts/web1/metrics"
    now = time.time()
    bad: list[dict[str, Any]] = [
        {"since": "yesterday"},
        {"until": "2026-13-01T00:00:00Z"},
        {"since": iso(now), "until": iso(now - 60)},  # until before since
        {"since": iso(now), "until": iso(now)},
        {"step": 0},
        {"step": "x"},
        {"since": iso(now - DAY), "step": 30},  # 2,880 points: more than 2,000
        {"step": 10**9},
    ]
    for params in bad:
        got = await api.client.get(url, params=params, headers=api.auth)
        assert got.status_code == 422, (params, got.text)
        assert "Traceback" not in got.text
    got = await api.client.get(url, params={"since": iso(now - DAY), "step": 44}, headers=api.auth)
    assert got.status_code == 200, got.text  # 1,964 points
    unknown = await api.client.get("/api/hosts/nope/metrics", headers=api.auth)
    assert unknown.status_code == 404, unknown.text

    made = await api.client.post(
        "/api/keys", json={"name": "web-read", "role": "read", "scope": {"role": "web"}}, headers=api.auth
    )
    assert made.status_code == 201, made.text
    web = {"Authorization": f"Bearer {made.json()['key']}"}
    assert (await api.client.get(url, headers=web)).status_code == 200
    out = await api.client.get("/api/hosts/db1/metrics", headers=web)
    assert out.status_code == 403, out.text
    assert out.json()["code"] == "out_of_scope"
    assert (await api.client.get(url)).status_code == 401


async def test_the_api_runs_the_retention_job(tmp_path: Path, nats_server: NatsServer, database: str) -> None:
    """Wired in the lifespan: with a short interval, samples older than the raw retention are folded."""
    settings = api_settings(tmp_path, nats_server.url, database, metrics_maintenance_interval=0.1)
    async with running_api(settings) as api:
        now = time.time()
        base = (now - 2 * DAY) // 300 * 300  # one 5-minute bucket
        await insert_rows(api.state.engine, MetricSample, [raw("h", base + i, 10.0) for i in range(5)])
        await insert_rows(api.state.engine, MetricSample, [raw("h", now - 10, 10.0)])

        async def folded() -> bool:
            return await count_rows(api.state.engine, MetricRollup) == 1

        await eventually(folded, timeout=10)
        assert await count_rows(api.state.engine, MetricSample) == 1


async def test_one_instance_at_a_time_runs_the_job_on_postgresql(tmp_path: Path) -> None:
    """While another transaction holds the job's advisory lock, a pass skips (None) and changes nothing."""
    async with fresh_database("postgresql", tmp_path) as url:
        engine = make_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(SQLModel.metadata.create_all)
            now = 1_800_000_000.0
            await insert_rows(engine, MetricSample, [raw("h", now - 2 * DAY, 10.0)])
            async with engine.begin() as other:
                await other.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": LOCK_ID})
                assert await maintain_once(engine, DAY, 30 * DAY, now=now) is None
            assert await count_rows(engine, MetricSample) == 1
            done = await maintain_once(engine, DAY, 30 * DAY, now=now)  # the lock is free again
            assert done is not None
            assert done.folded == 1
        finally:
            await engine.dispose()
