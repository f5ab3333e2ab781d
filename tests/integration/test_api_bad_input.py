"""Bad REST input gets a specific 422 with a small JSON body, never a 500, and nothing is recorded or sent.

The API runs in-process with its lifespan, on a real nats-server and real SQLite / PostgreSQL databases.
Bodies are sent as raw bytes where JSON libraries would refuse to write them (NaN, lone surrogates).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from tests.support.db import RunningApi, api_settings, running_api
from tests.support.natsserver import NatsServer

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer, database: str) -> AsyncIterator[RunningApi]:
    """The API in-process, with host h1 registered (no SSH check)."""
    async with running_api(api_settings(tmp_path, nats_server.url, database)) as running:
        added = await running.client.post(
            "/api/hosts", json={"id": "h1", "address": "10.0.0.1", "ssh_check": False}, headers=running.auth
        )
        assert added.status_code == 201, added.text
        yield running


async def sent_requests(nc: NATS) -> list[Msg]:
    """Every request on any agent or SSH exec subject from now on."""
    seen: list[Msg] = []

    async def record(msg: Msg) -> None:
        seen.append(msg)

    await nc.subscribe("warlock.agent.*.exec", cb=record)
    await nc.subscribe("warlock.ssh.*.exec", cb=record)
    await nc.flush()
    return seen


async def post_raw(api: RunningApi, path: str, raw: bytes) -> Any:
    """POST `raw` as a JSON body; assert a 422 whose body is JSON with a list of field errors; return it."""
    response = await api.client.post(path, content=raw, headers={**api.auth, **JSON})
    assert response.status_code == 422, (raw[:80], response.status_code, response.text[:500])
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body["detail"], list)
    assert body["detail"]
    return body


@pytest.mark.parametrize(
    ("raw", "loc", "echoed"),
    [
        (b'{"command": "true", "timeout": NaN}', ["body", "timeout"], "NaN"),
        (b'{"command": "true", "timeout": Infinity}', ["body", "timeout"], "Infinity"),
        (b'{"command": "true", "timeout": -Infinity}', ["body", "timeout"], "-Infinity"),
        (b'{"command": "\\ud800"}', ["body", "command"], "\\ud800"),
        (b'{"command": "echo \\udfff ok", "timeout": 5}', ["body", "command"], "echo \\udfff ok"),
        (b'{"command": "true", "\\ud83d": 1}', ["body"], "\\ud83d"),  # a key: refused as a string
    ],
)
async def test_non_finite_numbers_and_lone_surrogates_are_422(
    api: RunningApi, nc: NATS, raw: bytes, loc: list[str], echoed: object
) -> None:
    """NaN, ±Infinity and lone surrogates answer 422 naming the field, the input echoed JSON-safe (they
    were a 500 with a traceback: the 422 handler could not serialise them); nothing is recorded or sent."""
    seen = await sent_requests(nc)
    body = await post_raw(api, "/api/hosts/h1/exec", raw)
    error = body["detail"][0]
    assert error["loc"] == loc
    assert error["input"] == echoed
    history = await api.client.get("/api/hosts/h1/commands", headers=api.auth)
    assert history.json() == []
    assert seen == []


async def test_non_finite_numbers_in_host_bodies_are_422(api: RunningApi) -> None:
    """The same holds on the other routes: NaN as a port, a lone surrogate as a label key → 422."""
    for raw in (
        b'{"id": "h2", "address": "10.0.0.2", "ssh_check": false, "ssh_port": NaN}',
        b'{"id": "h2", "address": "10.0.0.2", "ssh_check": false, "labels": {"\\udc00": "x"}}',
        b'{"id": "h2", "address": "10.0.0.2", "ssh_check": false, "labels": {"a": Infinity}}',
    ):
        await post_raw(api, "/api/hosts", raw)
    assert (await api.client.get("/api/hosts/h2", headers=api.auth)).status_code == 404


async def test_echo_of_rejected_input_is_capped(api: RunningApi) -> None:
    """A 900,000-character command (under the body limit) answers a 422 of a few hundred bytes that notes
    the length; hundreds of errors are cut to 20 with the number left out."""
    response = await api.client.post("/api/hosts/h1/exec", json={"command": "x" * 900_000}, headers=api.auth)
    assert response.status_code == 422
    assert len(response.content) < 2_000, len(response.content)
    error = response.json()["detail"][0]
    assert error["type"] == "string_too_long"
    assert error["input"].startswith("x" * 100)
    assert "900000 characters" in error["input"]

    many = {"command": "true", **{f"extra{n}": "y" * 5_000 for n in range(150)}}
    response = await api.client.post("/api/hosts/h1/exec", json=many, headers=api.auth)
    assert response.status_code == 422
    assert len(response.content) < 20_000, len(response.content)
    body = response.json()
    assert len(body["detail"]) == 20
    assert body["errors_omitted"] == 130

    labels = {f"k{n}": "v" * 255 for n in range(65)}  # one label too many: the whole object is the input
    response = await api.client.post(
        "/api/hosts",
        json={"id": "h3", "address": "10.0.0.3", "ssh_check": False, "labels": labels},
        headers=api.auth,
    )
    assert response.status_code == 422
    assert len(response.content) < 3_000, len(response.content)


async def test_nul_in_command_is_422_and_nothing_runs(api: RunningApi, nc: NATS) -> None:
    """A NUL character in the command is refused at the API (422 naming it): no row, no request sent."""
    seen = await sent_requests(nc)
    response = await api.client.post(
        "/api/hosts/h1/exec", json={"command": "echo a\x00b", "timeout": 5}, headers=api.auth
    )
    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "command"]
    assert "NUL" in error["msg"]
    assert (await api.client.get("/api/hosts/h1/commands", headers=api.auth)).json() == []
    assert seen == []


@pytest.mark.parametrize("value", [0, 1, "false", "true", "no"])
@pytest.mark.parametrize("field", ["ssh_check", "install_agent"])
async def test_request_booleans_are_strict(api: RunningApi, field: str, value: object) -> None:
    """ssh_check and install_agent take only JSON true/false: 0, 1, "false", "true", "no" → 422, nothing
    registered (lax parsing registered a host without a pinned key on `"ssh_check": 0`)."""
    body = {"id": "h2", "address": "10.0.0.2", field: value}
    response = await api.client.post("/api/hosts", json=body, headers=api.auth)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", field]
    assert response.json()["detail"][0]["type"] == "bool_type"
    assert (await api.client.get("/api/hosts/h2", headers=api.auth)).status_code == 404


async def test_json_booleans_still_work(api: RunningApi) -> None:
    """JSON false registers a host without a key check."""
    body = {"id": "h2", "address": "10.0.0.2", "ssh_check": False, "install_agent": False}
    response = await api.client.post("/api/hosts", json=body, headers=api.auth)
    assert response.status_code == 201, response.text
    assert response.json()["host_key"] is None
