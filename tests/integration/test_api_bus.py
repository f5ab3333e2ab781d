"""The API's NATS side: token authority, host targets, presence, metrics (real nats-server, both DBs)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from services.api.store import crud
from shared import subjects
from shared.natsx import ERROR_CODE_HEADER
from shared.protocol import (
    ErrorReply,
    MetricsEvent,
    MetricsSample,
    PresenceConnected,
    PresenceDisconnected,
    TokenOk,
    TokenVerifyRequest,
    decode_token_reply,
    encode,
)
from shared.tokens import hash_token
from tests.support.db import RunningApi, api_settings, eventually, running_api
from tests.support.fakeagent import AgentKey, register_agent_key
from tests.support.natsserver import NatsServer

AGENT = AgentKey()  # h1's agent


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer, database: str) -> AsyncIterator[RunningApi]:
    """The API with host h1 (10.0.0.8, no pinned key) registered."""
    async with running_api(api_settings(tmp_path, nats_server.url, database)) as running:
        response = await running.client.post(
            "/api/hosts",
            json={"id": "h1", "address": "10.0.0.8", "ssh_user": "ops", "ssh_check": False},
            headers=running.auth,
        )
        assert response.status_code == 201
        await register_agent_key(running, "h1", AGENT.public_key)
        yield running


@pytest.fixture
async def gw(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A client playing a gateway: asks the token authority, publishes presence and metrics."""
    client = await nats_server.connect("gateway")
    yield client
    await client.drain()


@pytest.fixture
async def worker(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A client playing the SSH worker: looks up host targets."""
    client = await nats_server.connect("ssh-worker")
    yield client
    await client.drain()


@pytest.fixture
async def operator(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A client with the operator identity (the NATS CLI): `nats micro`."""
    client = await nats_server.connect("operator")
    yield client
    await client.drain()


def _connected(session: str, at: float, version: str = "1.0") -> PresenceConnected:
    return AGENT.connected("h1", session, at, agent_version=version)


def _disconnected(session: str) -> PresenceDisconnected:
    return PresenceDisconnected.model_validate(
        {"host_id": "h1", "session_id": session, "gateway_id": "gw-1", "reason": "bye", "at": time.time()}
    )


async def _agent(api: RunningApi) -> dict[str, object]:
    data: dict[str, object] = (await api.client.get("/api/agents/h1", headers=api.auth)).json()
    return data


async def test_token_authority_answers_by_hash(api: RunningApi, gw: NATS) -> None:
    """A known token hash → token_ok with its host; unknown → typed unauthorized; garbage → bad_request."""
    async with api.state.sessions() as session:
        token = await crud.issue_agent_token(session, "h1")
    assert len(token) == 64
    async with api.state.sessions() as session:
        agent = await crud.get_agent(session, "h1")
    assert agent is not None
    assert agent.token_hash == hash_token(token)
    assert agent.status == "disconnected"

    good = await gw.request(
        subjects.TOKEN_VERIFY, encode(TokenVerifyRequest(token_sha256=hash_token(token))), timeout=5
    )
    # with the agent's own key (if the API knows one): the gateway admits only a hello signed with it
    expected = {"host_id": "h1", "public_key": agent.public_key}
    assert decode_token_reply(good.data) == TokenOk.model_validate(expected)
    bad = await gw.request(
        subjects.TOKEN_VERIFY, encode(TokenVerifyRequest(token_sha256="f" * 64)), timeout=5
    )
    refused = decode_token_reply(bad.data)
    assert isinstance(refused, ErrorReply)
    assert refused.code == "unauthorized"
    assert bad.headers is not None
    assert bad.headers[ERROR_CODE_HEADER] == "401"
    garbage = decode_token_reply((await gw.request(subjects.TOKEN_VERIFY, b"{nope", timeout=5)).data)
    assert isinstance(garbage, ErrorReply)
    assert garbage.code == "bad_request"
    assert token not in (await api.client.get("/api/agents/h1", headers=api.auth)).text


async def test_api_registers_as_a_micro_service(api: RunningApi, operator: NATS) -> None:
    """`nats micro ls` sees warlock-api with its token-verify and ops-exec endpoints (no SSH-target lookup:
    the worker takes targets only from the API's signed requests)."""
    info = json.loads((await operator.request("$SRV.INFO.warlock-api", b"", timeout=5)).data)
    endpoints = {e["name"]: (e["subject"], e["queue_group"]) for e in info["endpoints"]}
    assert endpoints["token-verify"] == (subjects.TOKEN_VERIFY, subjects.AUTH_QUEUE)
    assert endpoints["ops-exec"] == (subjects.ops_exec_wildcard(), subjects.API_QUEUE)
    assert "host-target" not in endpoints


async def test_presence_updates_agent_and_ignores_older_sessions_disconnect(
    api: RunningApi, gw: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    """connected sets the record; an older session's disconnect is ignored; the current one's is not."""
    assert (await _agent(api))["connected"] is False
    await gw.publish(subjects.presence("h1"), b"not json")  # skipped, logged
    await gw.publish(subjects.presence("h1"), encode(_connected("s-old", time.time() - 10)))
    await gw.publish(subjects.presence("h1"), encode(_connected("s-new", time.time(), version="2.0")))

    async def on_new() -> dict[str, object] | None:
        agent = await _agent(api)
        return agent if agent["session_id"] == "s-new" else None

    agent = await eventually(on_new)
    assert agent["connected"] is True
    assert agent["status"] == "connected"
    assert agent["agent_version"] == "2.0"
    assert agent["gateway_id"] == "gw-1"
    assert agent["connected_at"] is not None

    caplog.set_level(logging.INFO, logger="services.api.fleet.bus")
    await gw.publish(subjects.presence("h1"), encode(_disconnected("s-old")))
    await gw.publish(subjects.presence("h1"), encode(_connected("s-old", time.time() - 20)))  # stale

    async def both_handled() -> bool:
        text = caplog.text
        return "presence disconnected of h1 (session s-old) ignored" in text and (
            "presence connected of h1 (session s-old) ignored" in text
        )

    await eventually(both_handled)
    agent = await _agent(api)
    assert agent["status"] == "connected"
    assert agent["session_id"] == "s-new"

    await gw.publish(subjects.presence("h1"), encode(_disconnected("s-new")))

    async def offline() -> bool:
        return (await _agent(api))["status"] == "disconnected"

    await eventually(offline)
    listed = (await api.client.get("/api/agents", headers=api.auth)).json()
    assert [(a["host_id"], a["connected"]) for a in listed] == [("h1", False)]


async def test_presence_for_unknown_host_is_skipped(api: RunningApi, gw: NATS) -> None:
    """A host that is not registered gets no agent record (and the API keeps serving)."""
    event = AGENT.connected("ghost", "s1", time.time())
    await gw.publish(subjects.presence("ghost"), encode(event))
    await gw.publish(subjects.presence("h1"), encode(_connected("s1", time.time())))

    async def h1_connected() -> bool:
        return (await _agent(api))["connected"] is True

    await eventually(h1_connected)
    listed = (await api.client.get("/api/agents", headers=api.auth)).json()
    assert [a["host_id"] for a in listed] == ["h1"]


async def test_metrics_update_last_ping(api: RunningApi, gw: NATS) -> None:
    """A metrics event sets last_ping on the host's agent record."""
    await gw.publish(subjects.presence("h1"), encode(_connected("s1", time.time())))

    async def connected() -> bool:
        return (await _agent(api))["connected"] is True

    await eventually(connected)
    assert (await _agent(api))["last_ping"] is None
    sample = MetricsSample.model_validate(
        {
            "timestamp": time.time(),
            **dict.fromkeys(["cpu_percent", "load_1", "load_5", "load_15", "memory_percent"], 1.0),
            **dict.fromkeys(["memory_total", "memory_available", "memory_used", "swap_total"], 1),
            **dict.fromkeys(["swap_used", "net_bytes_sent", "net_bytes_recv", "net_packets_sent"], 1),
            "swap_percent": 0.0,
            "net_packets_recv": 1,
            "uptime_s": 5.0,
            "process_count": 9,
        }
    )
    await gw.publish(subjects.metrics("h1"), b"[]")  # skipped
    event = MetricsEvent.model_validate({"host_id": "h1", "gateway_id": "gw-1", "sample": sample})
    await gw.publish(subjects.metrics("h1"), encode(event))

    async def pinged() -> object:
        return (await _agent(api))["last_ping"]

    last_ping = await eventually(pinged)
    assert isinstance(last_ping, str)


@pytest.mark.parametrize("how", ["unsigned", "other-key", "edited-version", "stale", "other-host"])
async def test_unverified_presence_is_not_recorded(
    gw: NATS, api: RunningApi, nc: NATS, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """A connected event whose hello is not signed by h1's agent key (or signed too long ago) does not
    mark the agent connected; it is counted and logged once per gateway and host, however many come."""
    caplog.set_level(logging.WARNING, logger="services.api.fleet.verify")
    now = time.time()
    if how == "unsigned":
        bad = _connected("s-bad", now).model_copy(update={"signature": None, "signed_at": None})
    elif how == "other-key":
        bad = AgentKey().connected("h1", "s-bad", now)
    elif how == "edited-version":
        bad = _connected("s-bad", now).model_copy(update={"agent_version": "6.6.6"})
    elif how == "stale":
        bad = AGENT.connected("h1", "s-bad", now, signed_at=now - 3600)  # an old hello, replayed
    else:
        bad = AGENT.connected("ghost", "s-bad", now).model_copy(update={"host_id": "h1"})
    for _ in range(3):
        await gw.publish(subjects.presence("h1"), encode(bad))

    async def counted() -> bool:
        return api.state.runner.rejections.count("presence connected") == 3

    await eventually(counted)
    agent = await _agent(api)
    assert (agent["connected"], agent["session_id"]) == (False, None)
    assert caplog.text.count("presence connected from gateway gw-1 for h1 not accepted") == 1
    await gw.publish(subjects.presence("h1"), encode(_connected("s-good", time.time())))

    async def good() -> bool:
        return (await _agent(api))["session_id"] == "s-good"

    await eventually(good)  # the API kept serving, and a genuine hello still counts


async def test_hello_of_a_host_whose_key_arrives_just_after_counts(
    gw: NATS, api: RunningApi, nc: NATS
) -> None:
    """A freshly installed agent connects before its install has stored its key: the hello is checked
    again for a while and counts once the key is there (a hello signed by another key still does not)."""
    body = {"id": "h2", "address": "10.0.0.9", "ssh_check": False}
    assert (await api.client.post("/api/hosts", json=body, headers=api.auth)).status_code == 201
    new_agent = AgentKey()
    await gw.publish(subjects.presence("h2"), encode(new_agent.connected("h2", "s-fresh", time.time())))
    await nc.flush()
    await asyncio.sleep(1.0)
    assert (await api.client.get("/api/agents/h2", headers=api.auth)).json()["connected"] is False  # not yet
    await register_agent_key(api, "h2", new_agent.public_key)

    async def connected() -> bool:
        agent = (await api.client.get("/api/agents/h2", headers=api.auth)).json()
        return agent.get("session_id") == "s-fresh" and agent["connected"] is True

    await eventually(connected)
    assert api.state.runner.rejections.count("presence connected") == 0
