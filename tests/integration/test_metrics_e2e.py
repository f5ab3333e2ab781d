"""`/metrics` of the API, the gateway and the SSH worker, and JSON logs without secrets, on a real fleet.

Real processes (API on PostgreSQL, gateway, agent, SSH worker, sshd, nats-server), every one started with
``WARLOCK_LOG_FORMAT=json``: the metrics parse as Prometheus text and move when commands run (by agent,
then by SSH once the agent is stopped), every log line is one JSON object, the API logs one access line per
request with the key's name, and no log holds the API key, the agent token or either's hash.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.api.settings import ApiSettings
from services.ctl import admin
from services.dev.procs import Proc
from shared import signing
from shared.tokens import hash_token
from tests.support.db import fresh_database
from tests.support.natsserver import NatsServer
from tests.support.sshd import Sshd
from tests.support.stack import Api, Stack

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text page, by name and labels (raises if it is not the format)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` with exactly `labels` (0 when absent: a labelled counter starts unseen)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@dataclass
class Fleet:
    """Host `box` reachable by agent and by SSH, behind a real API; every process logs JSON."""

    stack: Stack
    api: Api
    http: httpx.AsyncClient
    sshd: Sshd
    agent: Proc
    ssh_worker: Proc
    gateway_port: int
    ssh_metrics_port: int
    token: str

    async def scrape(self, url: str) -> Samples:
        """GET `url` without any credential; assert 200 and the Prometheus content type; parse it."""
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.get(url)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("text/plain; version=")
        return parse(answer.text)

    async def api_metrics(self) -> Samples:
        return await self.scrape(f"{self.api.url}/metrics")

    async def gateway_metrics(self) -> Samples:
        return await self.scrape(f"http://127.0.0.1:{self.gateway_port}/metrics")

    async def ssh_metrics(self) -> Samples:
        return await self.scrape(f"http://127.0.0.1:{self.ssh_metrics_port}/metrics")

    async def exec(self, command: str, timeout: float = 10.0) -> dict[str, object]:
        answer = await self.http.post("/api/hosts/box/exec", json={"command": command, "timeout": timeout})
        assert answer.status_code == 200, answer.text
        body: dict[str, object] = answer.json()
        return body

    async def wait_agent(self, connected: bool) -> None:
        for _ in range(100):
            answer = await self.http.get("/api/agents/box")
            if answer.status_code == 200 and answer.json()["connected"] is connected:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"agent never became connected={connected}")


@pytest.fixture
async def fleet(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Fleet]:
    """API (PostgreSQL), SSH worker (metrics on a free port), gateway, sshd, agent; all logging JSON."""
    monkeypatch.setenv("WARLOCK_LOG_FORMAT", "json")  # every child inherits it (Proc adds os.environ)
    monkeypatch.setenv("WARLOCK_SSH_METRICS_PORT", "0")
    sshd = Sshd(tmp_path / "sshd")
    try:
        async with fresh_database("postgresql", tmp_path) as db_url:
            api = stack.start_api(db_url)
            # stack.Api's pattern takes ``\S+`` after the URL: in a JSON line that is ``..."}`` too
            api.url = api.url.split('"')[0]
            worker = stack.start_fallback(sshd.client_key_path)
            port = int(worker.wait_for(r"ssh worker metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
            gw = stack.start_gateway()
            async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=60) as http:
                added = await http.post(
                    "/api/hosts",
                    json={
                        "id": "box",
                        "address": "127.0.0.1",
                        "ssh_port": sshd.port,
                        "ssh_user": sshd.username,
                    },
                )
                assert added.status_code == 201, added.text
                token = stack.agent_token(api, "box")
                identity = tmp_path / "box-agent.key"
                agent_key, _ = signing.ensure_private(identity)
                settings = ApiSettings(database_url=db_url, api_key_file=tmp_path / "unused-api-key")
                await admin.register_agent_key(settings, "box", signing.public_text(agent_key))
                agent = stack.start_agent(
                    "box-agent", "box", token, [gw.url], identity_key_file=str(identity)
                )
                fleet = Fleet(stack, api, http, sshd, agent, worker, gw.port, port, token)
                await fleet.wait_agent(True)
                yield fleet
                stack.close()
    finally:
        sshd.stop()


async def test_metrics_move_and_logs_are_json_without_secrets(fleet: Fleet) -> None:
    """Agent exec, a timed-out exec, then (agent stopped) an SSH exec: every counter moves as it should."""
    api0, gw0, ssh0 = await fleet.api_metrics(), await fleet.gateway_metrics(), await fleet.ssh_metrics()
    assert value(gw0, "warlock_gateway_sessions") == 1
    assert value(gw0, "warlock_gateway_connects_total") >= 1
    assert value(gw0, "warlock_gateway_upgrades_total", status="101") >= 1

    first = await fleet.exec("echo hello")
    assert (first["via"], first["status"]) == ("agent", "succeeded")
    late = await fleet.exec("sleep 5", timeout=0.5)  # the agent kills it: timed_out, code timeout
    assert (late["via"], late["status"], late["error_code"]) == ("agent", "timed_out", "timeout")
    api1 = await fleet.api_metrics()
    assert value(api1, "warlock_exec_total", via="agent", status="succeeded") == (
        value(api0, "warlock_exec_total", via="agent", status="succeeded") + 1
    )
    assert value(api1, "warlock_exec_total", via="agent", status="timed_out") == (
        value(api0, "warlock_exec_total", via="agent", status="timed_out") + 1
    )
    assert value(api1, "warlock_exec_seconds_count", via="agent") == (
        value(api0, "warlock_exec_seconds_count", via="agent") + 2
    )
    assert value(api1, "warlock_exec_seconds_sum", via="agent") >= 0.5  # the timed-out one ran 0.5 s
    assert (
        value(api1, "warlock_errors_total", code="timeout")
        == value(api0, "warlock_errors_total", code="timeout") + 1
    )
    # the exec path's two store writes per command, and ORM statements (the key check, the agent lookups)
    assert value(api1, "warlock_db_query_seconds_count", source="runstore", op="start") >= 2
    assert value(api1, "warlock_db_query_seconds_count", source="runstore", op="finish") >= 2
    assert total(api1, "warlock_db_query_seconds_count", source="orm") > total(
        api0, "warlock_db_query_seconds_count", source="orm"
    )
    assert value(api1, "warlock_http_requests_total", method="POST", status="200") >= 2
    assert value(api1, "warlock_exec_total", via="ssh", status="succeeded") == 0  # no fallback yet

    assert fleet.agent.stop() == 0
    await fleet.wait_agent(False)
    gw2 = await fleet.gateway_metrics()
    assert value(gw2, "warlock_gateway_sessions") == 0
    assert (
        total(gw2, "warlock_gateway_disconnects_total") == total(gw0, "warlock_gateway_disconnects_total") + 1
    )

    second = await fleet.exec("echo over-ssh")
    assert (second["via"], second["status"]) == ("ssh", "succeeded")
    api3, ssh3 = await fleet.api_metrics(), await fleet.ssh_metrics()
    assert value(api3, "warlock_exec_total", via="ssh", status="succeeded") == 1  # the fallback, counted
    assert value(api3, "warlock_exec_seconds_count", via="ssh") == 1
    assert (
        value(ssh3, "warlock_ssh_exec_total", outcome="ok")
        == value(ssh0, "warlock_ssh_exec_total", outcome="ok") + 1
    )
    assert value(ssh3, "warlock_ssh_exec_seconds_count") == value(ssh0, "warlock_ssh_exec_seconds_count") + 1
    assert value(ssh3, "warlock_ssh_in_flight") == 0
    # labels stay bounded: no host id, command id or key anywhere in a page
    for page in (api3, gw2, ssh3):
        for _, labels in page:
            for _, label_value in labels:
                assert "box" not in label_value
                assert label_value not in (first["command_id"], second["command_id"])

    await asyncio.sleep(0.3)  # the last access lines are written after the response
    logs = {proc.name: proc.log_path.read_text() for proc in fleet.stack.procs}
    assert {"api", "ssh-worker", "gw1", "box-agent"} <= set(logs)
    for name, text in logs.items():
        lines = [line for line in text.splitlines() if line.strip()]
        assert lines, name
        for line in lines:
            entry = json.loads(line)  # every line is one JSON object
            assert {"time", "level", "logger", "message"} <= set(entry), (name, line)

    access = [json.loads(line) for line in logs["api"].splitlines() if '"services.api.access"' in line]
    execs = [e for e in access if e["method"] == "POST" and e["path"] == "/api/hosts/box/exec"]
    assert len(execs) == 3
    assert all(e["status"] == 200 and e["key"] == "bootstrap" and e["duration_ms"] > 0 for e in execs)
    scrapes = [e for e in access if e["path"] == "/metrics"]
    assert scrapes
    assert all(e["key"] == "-" and e["status"] == 200 for e in scrapes)

    secrets = {
        "API key": fleet.api.key,
        "API key hash": hash_token(fleet.api.key),
        "agent token": fleet.token,
        "agent token hash": hash_token(fleet.token),
    }
    for name, text in logs.items():
        for what, secret in secrets.items():
            assert secret not in text, f"{what} in the log of {name}"


async def test_nats_reconnects_are_counted_by_every_service(
    fleet: Fleet, nats_server: NatsServer, tmp_path: Path
) -> None:
    """NATS restarted on its port: the API, the gateway and the SSH worker each count a reconnect."""
    nats_server.stop()
    restarted = NatsServer(tmp_path, port=nats_server.port)  # same directory: the same nkeys
    try:
        pages: dict[str, Samples] = {}
        for _ in range(100):
            pages = {
                "api": await fleet.api_metrics(),
                "gateway": await fleet.gateway_metrics(),
                "ssh-worker": await fleet.ssh_metrics(),
            }
            if all(
                value(page, "warlock_nats_events_total", role=role, event="reconnected") >= 1
                for role, page in pages.items()
            ):
                break
            await asyncio.sleep(0.1)
        for role, page in pages.items():
            assert value(page, "warlock_nats_events_total", role=role, event="disconnected") >= 1, role
            assert value(page, "warlock_nats_events_total", role=role, event="reconnected") >= 1, role
        await fleet.wait_agent(True)
        answer = await fleet.exec("echo after")
        assert answer["status"] == "succeeded"
    finally:
        fleet.stack.close()
        restarted.stop()
