"""The API's HTTP surface against a real nats-server and real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import logging
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared import signing, subjects
from shared.errors import ErrorCode
from shared.natsx import error, reply
from shared.protocol import SshProbeOk, SshProbeRequest, decode_model
from tests.support.db import RunningApi, api_settings, eventually, running_api
from tests.support.fakeagent import api_signer
from tests.support.natsserver import NatsServer

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ0ZXN0a2V5MDEyMzQ1Njc4OWFiY2RlZmdoaWprbG1u"
FINGERPRINT = "SHA256:dGVzdGZpbmdlcnByaW50"


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer, database: str) -> AsyncIterator[RunningApi]:
    """The API app running in-process on the test's NATS and database."""
    async with running_api(api_settings(tmp_path, nats_server.url, database)) as running:
        yield running


@pytest.fixture
async def worker(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """The SSH worker's identity: only it may answer probes."""
    client = await nats_server.connect("ssh-worker")
    yield client
    await client.close()


async def _probe_worker(nc: NATS, probes: list[SshProbeRequest], answer_error: bool = False) -> None:
    async def handler(msg: Msg) -> None:
        probes.append(decode_model(SshProbeRequest, msg.data))
        if answer_error:
            await reply(nc, msg, error(ErrorCode.CONNECT_FAILED, "connection refused by 10.9.9.9:22"))
        else:
            await reply(nc, msg, SshProbeOk(host_key=HOST_KEY, fingerprint=FINGERPRINT))

    await nc.subscribe(subjects.SSH_PROBE, queue=subjects.SSH_QUEUE, cb=handler)
    await nc.flush()


async def test_api_routes_refuse_missing_or_wrong_key_with_json_401(api: RunningApi) -> None:
    """No key and a wrong key get 401 with a JSON detail and WWW-Authenticate; the right key gets 200."""
    missing = await api.client.get("/api/hosts")
    wrong = await api.client.get("/api/hosts", headers={"Authorization": "Bearer " + "0" * 64})
    basic = await api.client.get("/api/agents", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    ok = await api.client.get("/api/hosts", headers=api.auth)
    for response in (missing, wrong, basic):
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert isinstance(response.json()["detail"], str)
    assert ok.status_code == 200
    assert ok.json() == []


async def test_bootstrap_key_file_is_0600_and_written_once(
    tmp_path: Path, nats_server: NatsServer, database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The first start writes the key (0600, parent 0700) and logs the path only; a restart keeps it."""
    settings = api_settings(tmp_path, nats_server.url, database)
    with caplog.at_level(logging.INFO):
        async with running_api(settings) as first:
            key = first.key
    assert len(key) == 64
    mode = settings.api_key_file.stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(settings.api_key_file.parent.stat().st_mode) == 0o700
    assert f"api key written to {settings.api_key_file}" in caplog.text
    assert key not in caplog.text
    written_at = settings.api_key_file.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO):
        async with running_api(settings) as second:
            response = await second.client.get("/api/hosts", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    assert settings.api_key_file.stat().st_mtime_ns == written_at
    assert settings.api_key_file.read_text().strip() == key
    assert "api key written" not in caplog.text


async def test_add_host_pins_the_probed_host_key(api: RunningApi, worker: NATS) -> None:
    """A probe answered by the worker pins its host key; the host is then found by id and by address."""
    probes: list[SshProbeRequest] = []
    await _probe_worker(worker, probes)
    body = {
        "id": "web-1",
        "address": "10.0.0.5",
        "ssh_port": 2222,
        "ssh_user": "deploy",
        "labels": {"a": "b"},
    }
    created = await api.client.post("/api/hosts", json=body, headers=api.auth)
    assert created.status_code == 201, created.text
    assert created.json()["host_key"] == HOST_KEY
    assert created.json()["host_key_fingerprint"] == FINGERPRINT
    [probe] = probes
    assert (probe.host_id, probe.address, probe.port, probe.username) == ("web-1", "10.0.0.5", 2222, "deploy")
    trusted = signing.TrustedKeys([api_signer(api).public_key])  # the probe is signed by the API
    assert signing.verify_command(
        "probe", signing.signed_fields(probe), probe.signature, trusted, "web-1", 600
    )
    by_address = await api.client.get("/api/hosts/10.0.0.5", headers=api.auth)
    assert by_address.status_code == 200
    assert by_address.json()["id"] == "web-1"
    assert by_address.json()["labels"] == {"a": "b"}
    assert by_address.json()["created_at"].endswith(("Z", "+00:00"))
    listed = await api.client.get("/api/hosts", headers=api.auth)
    assert [h["id"] for h in listed.json()] == ["web-1"]


async def test_add_host_probe_error_is_422_with_the_reason(api: RunningApi, worker: NATS) -> None:
    """A typed probe error (connect_failed) answers 422 naming it, and the host is not registered."""
    await _probe_worker(worker, [], answer_error=True)
    response = await api.client.post("/api/hosts", json={"id": "h1", "address": "10.9.9.9"}, headers=api.auth)
    assert response.status_code == 422
    assert response.json()["code"] == "connect_failed"
    assert "connection refused" in response.json()["detail"]
    assert (await api.client.get("/api/hosts/h1", headers=api.auth)).status_code == 404


async def test_add_host_without_ssh_worker_is_503(api: RunningApi) -> None:
    """No SSH worker on NATS: 503 (not a timeout, not a 500), and nothing is registered."""
    response = await api.client.post("/api/hosts", json={"id": "h1", "address": "10.0.0.1"}, headers=api.auth)
    assert response.status_code == 503
    assert "SSH worker" in response.json()["detail"]
    assert (await api.client.get("/api/hosts", headers=api.auth)).json() == []


async def test_duplicate_host_id_or_address_is_409(api: RunningApi) -> None:
    """ssh_check=false registers without a key; the same id or address again is 409."""
    first = await api.client.post(
        "/api/hosts", json={"id": "h1", "address": "10.0.0.1", "ssh_check": False}, headers=api.auth
    )
    assert first.status_code == 201
    assert first.json()["host_key"] is None
    same_id = await api.client.post(
        "/api/hosts", json={"id": "h1", "address": "10.0.0.2", "ssh_check": False}, headers=api.auth
    )
    same_address = await api.client.post(
        "/api/hosts", json={"id": "h2", "address": "10.0.0.1", "ssh_check": False}, headers=api.auth
    )
    assert same_id.status_code == 409
    assert same_address.status_code == 409
    assert "address" in same_address.json()["detail"]


async def test_unknown_host_and_command_are_404_json(api: RunningApi) -> None:
    """Every route naming an unknown host or command answers 404 with a JSON detail."""
    calls = [
        ("GET", "/api/hosts/nope", None),
        ("DELETE", "/api/hosts/nope", None),
        ("GET", "/api/agents/nope", None),
        ("GET", "/api/hosts/nope/commands", None),
        ("POST", "/api/hosts/nope/exec", {"command": "true"}),
        ("GET", "/api/commands/abc", None),
    ]
    for method, path, body in calls:
        response = await api.client.request(method, path, json=body, headers=api.auth)
        assert response.status_code == 404, (method, path, response.text)
        assert "detail" in response.json()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/hosts/h1/exec", {}),
        ("/api/hosts/h1/exec", {"command": ""}),
        ("/api/hosts/h1/exec", {"command": "true", "timeout": 0}),
        ("/api/hosts/h1/exec", {"command": "true", "timeout": -5}),
        ("/api/hosts/h1/exec", {"command": "true", "timeout": "soon"}),
        ("/api/hosts/h1/exec", "not json"),
        ("/api/hosts", {"id": "Bad Id!", "address": "10.0.0.3"}),
        ("/api/hosts", {"id": "x" * 64, "address": "10.0.0.3"}),
        ("/api/hosts", {"id": "h2", "address": "10.0.0.3; rm -rf /"}),
        ("/api/hosts", {"id": "h2", "address": "10.0.0.3", "ssh_port": 0}),
        ("/api/hosts", {"id": "h2", "address": "10.0.0.3", "labels": ["x"]}),
        ("/api/hosts", {"address": "10.0.0.3"}),
    ],
)
async def test_bad_bodies_are_422_with_field_errors(api: RunningApi, path: str, body: object) -> None:
    """Bad bodies answer 422 with a list of field errors, never 500."""
    await api.client.post(
        "/api/hosts", json={"id": "h1", "address": "10.0.0.1", "ssh_check": False}, headers=api.auth
    )
    if isinstance(body, str):
        response = await api.client.post(
            path, content=body, headers={**api.auth, "Content-Type": "application/json"}
        )
    else:
        response = await api.client.post(path, json=body, headers=api.auth)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list)
    assert detail
    assert "loc" in detail[0]


async def test_delete_host_is_204_then_404(api: RunningApi) -> None:
    """DELETE by address removes the host: 204, then the host is unknown."""
    await api.client.post(
        "/api/hosts", json={"id": "h1", "address": "10.0.0.1", "ssh_check": False}, headers=api.auth
    )
    deleted = await api.client.delete("/api/hosts/10.0.0.1", headers=api.auth)
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert (await api.client.get("/api/hosts/h1", headers=api.auth)).status_code == 404


async def test_healthz_reports_nats_and_database(api: RunningApi, nats_server: NatsServer) -> None:
    """/healthz needs no key: 200 when both are up; 503 naming NATS once the server is gone."""
    healthy = await api.client.get("/healthz")
    assert healthy.status_code == 200
    assert healthy.json() == {"status": "ok", "nats": "ok", "database": "ok"}
    nats_server.stop()
    response = await api.client.get("/healthz")
    for _ in range(100):
        if response.status_code == 503:
            break
        await asyncio.sleep(0.05)
        response = await api.client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["nats"].startswith("unavailable: ")
    assert response.json()["database"] == "ok"


async def test_openapi_docs_are_served(api: RunningApi) -> None:
    """/docs and /openapi.json are served, list the exec route and declare the bearer key on /api only."""
    assert (await api.client.get("/docs")).status_code == 200
    spec = (await api.client.get("/openapi.json")).json()
    assert "/api/hosts/{host}/exec" in spec["paths"]
    assert spec["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key (`warlock api-key create`)",
    }
    assert spec["paths"]["/api/hosts/{host}/exec"]["post"]["security"] == [{"ApiKey": []}]
    assert spec["paths"]["/api/agents"]["get"]["security"] == [{"ApiKey": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


async def test_routes_that_need_nats_answer_503_and_change_nothing_while_it_is_down(
    api: RunningApi, nats_server: NatsServer
) -> None:
    """NATS gone: exec, SSH-checked add, DELETE (it must close the live session), health: 503, no change."""
    body = {"id": "h1", "address": "10.0.0.1", "ssh_check": False}
    assert (await api.client.post("/api/hosts", json=body, headers=api.auth)).status_code == 201
    nats_server.stop()
    await eventually(lambda: _true(not api.state.link.connected))
    refused = [
        await api.client.post("/api/hosts/h1/exec", json={"command": "true"}, headers=api.auth),
        await api.client.post("/api/hosts", json={"id": "h2", "address": "10.0.0.2"}, headers=api.auth),
        await api.client.delete("/api/hosts/h1", headers=api.auth),
        await api.client.post("/api/agents/h1/health", headers=api.auth),
    ]
    for answer in refused:
        assert answer.status_code == 503, answer.text
        assert answer.json()["detail"].startswith("NATS unavailable"), answer.text
    assert (await api.client.get("/api/hosts/h1", headers=api.auth)).status_code == 200
    assert (await api.client.get("/api/hosts/h2", headers=api.auth)).status_code == 404
    assert (await api.client.get("/api/hosts/h1/commands", headers=api.auth)).json() == []


async def _true(value: bool) -> bool:
    return value
