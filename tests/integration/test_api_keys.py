"""API keys: roles, label scopes, expiry, revocation, per-key rate limits and the keys REST API, against a
real nats-server and real databases (SQLite and PostgreSQL).

Exec runs to hosts with no agent and no SSH worker: the run is recorded (``undeliverable``), which is all
these tests need to see that a request was let through, and by whom.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from sqlmodel import select

from services.api.http.auth import RoleCheck
from services.api.main import create_app
from services.api.store.models import ApiKey, CommandRun, KeyRole
from services.ctl.cli import main as cli_main
from tests.support.db import RunningApi, api_settings, running_api
from tests.support.natsserver import NatsServer

HOSTS = {"web1": {"role": "web"}, "web2": {"role": "web", "dc": "eu"}, "db1": {"role": "db"}}


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer, database: str) -> AsyncIterator[RunningApi]:
    """The API with three hosts (web1, web2: role=web; db1: role=db), added without SSH check."""
    settings = api_settings(tmp_path, nats_server.url, database, exec_grace=0.2, ssh_grace=0.2)
    async with running_api(settings) as running:
        for n, (host, labels) in enumerate(HOSTS.items()):
            body = {"id": host, "address": f"10.0.0.{n + 1}", "ssh_check": False, "labels": labels}
            response = await running.client.post("/api/hosts", json=body, headers=running.auth)
            assert response.status_code == 201, response.text
        yield running


async def new_key(api: RunningApi, name: str, role: str, **body: Any) -> dict[str, str]:
    """Create a key through the API (as the bootstrap admin); its Authorization header."""
    response = await api.client.post("/api/keys", json={"name": name, "role": role, **body}, headers=api.auth)
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['key']}"}


async def runs(api: RunningApi) -> list[CommandRun]:
    """Every recorded command run."""
    async with api.state.sessions() as session:
        return list((await session.exec(select(CommandRun))).all())


def assert_forbidden(response: Any, code: str = "forbidden") -> None:
    assert response.status_code == 403, response.text
    assert response.json()["code"] == code
    assert isinstance(response.json()["detail"], str)


# ----------------------------------------------------------------------------- role declarations


def flat_routes(routes: Iterable[Any]) -> Iterator[tuple[str, set[str], list[Any]]]:
    """(path, methods, the dependency calls it runs) of every API route, routers included: FastAPI
    0.165 keeps an included router as one entry whose `effective_candidates` are its routes, with the
    full path and every dependency (router and include level too) in their `dependant`."""
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if candidates is not None:
            yield from flat_routes(candidates())
        elif isinstance(route, APIRoute) or hasattr(route, "original_route"):
            yield route.path, set(route.methods or ()), [d.call for d in route.dependant.dependencies]


async def test_every_api_route_declares_exactly_one_role(tmp_path: Path) -> None:
    """Walks the app's routes: an /api route without a role declaration (or with two) fails this test."""
    app = create_app(api_settings(tmp_path, "nats://127.0.0.1:1", f"sqlite+aiosqlite:///{tmp_path}/w.db"))
    declared: dict[tuple[str, str], KeyRole] = {}
    undeclared = []
    seen_open = set()
    for path, methods, calls in flat_routes(app.routes):
        checks = [c for c in calls if isinstance(c, RoleCheck)]
        for method in methods:
            if not path.startswith("/api/"):
                assert not checks, f"{method} {path} is open but declares a role"
                seen_open.add(path)
            elif len(checks) != 1:
                undeclared.append(f"{method} {path}: {len(checks)} role declarations")
            else:
                declared[(method, path)] = checks[0].role
    assert {"/healthz", "/agent/install.sh", "/agent/enroll"} <= seen_open  # the walk reaches every router
    assert len(declared) >= 17
    assert not undeclared, undeclared
    assert declared[("GET", "/api/hosts")] == KeyRole.READ
    assert declared[("POST", "/api/hosts/{host}/exec")] == KeyRole.OPERATE
    assert declared[("POST", "/api/hosts")] == KeyRole.ADMIN
    assert declared[("POST", "/api/agents/{host}/install")] == KeyRole.ADMIN
    assert all(declared[(m, "/api/keys")] == KeyRole.ADMIN for m in ("GET", "POST"))
    assert declared[("DELETE", "/api/keys/{name}")] == KeyRole.ADMIN
    for (method, path), role in declared.items():  # every GET is read, except the keys'
        if method == "GET" and not path.startswith("/api/keys"):
            assert role == KeyRole.READ, (method, path)


# ----------------------------------------------------------------------------- roles


async def test_read_key_reads_but_cannot_exec_and_nothing_is_recorded(api: RunningApi) -> None:
    """A read key lists and shows hosts; its exec is 403 `forbidden` and no run is recorded."""
    reader = await new_key(api, "reader", "read")
    assert (await api.client.get("/api/hosts", headers=reader)).status_code == 200
    assert (await api.client.get("/api/hosts/web1", headers=reader)).status_code == 200
    assert (await api.client.get("/api/agents", headers=reader)).status_code == 200
    refused = await api.client.post("/api/hosts/web1/exec", json={"command": "true"}, headers=reader)
    assert_forbidden(refused)
    assert "read" in refused.json()["detail"]
    assert "operate" in refused.json()["detail"]
    assert_forbidden(await api.client.get("/api/keys", headers=reader))
    assert await runs(api) == []


async def test_operate_key_runs_commands_but_cannot_add_hosts_or_manage_keys(api: RunningApi) -> None:
    """An operate key execs (requested_by is its name) but gets 403 adding a host or touching keys."""
    ops = await new_key(api, "ops-1", "operate")
    ran = await api.client.post("/api/hosts/web1/exec", json={"command": "true", "timeout": 1}, headers=ops)
    assert ran.status_code == 200, ran.text
    assert ran.json()["requested_by"] == "api-key:ops-1"
    body = {"id": "new1", "address": "10.9.9.9", "ssh_check": False}
    assert_forbidden(await api.client.post("/api/hosts", json=body, headers=ops))
    assert_forbidden(await api.client.delete("/api/hosts/web1", headers=ops))
    assert_forbidden(await api.client.post("/api/agents/web1/pull-token", headers=ops))
    assert_forbidden(await api.client.post("/api/keys", json={"name": "x", "role": "admin"}, headers=ops))
    assert_forbidden(await api.client.delete("/api/keys/bootstrap", headers=ops))
    assert (await api.client.get("/api/hosts/new1", headers=api.auth)).status_code == 404
    recorded = await runs(api)
    assert [(r.host_id, r.requested_by) for r in recorded] == [("web1", "api-key:ops-1")]


async def test_bootstrap_key_is_an_unscoped_admin(api: RunningApi) -> None:
    """The key written at first start is admin with no scope and no expiry."""
    listed = (await api.client.get("/api/keys", headers=api.auth)).json()
    assert [(k["name"], k["role"], k["scope"], k["expires_at"], k["state"]) for k in listed] == [
        ("bootstrap", "admin", None, None, "active")
    ]
    assert listed[0]["last_used_at"] is not None  # it was just used
    assert "key" not in listed[0]
    assert "key_hash" not in listed[0]


# ----------------------------------------------------------------------------- scopes


async def test_scoped_key_sees_and_runs_only_on_its_hosts(api: RunningApi) -> None:
    """role=web: lists show web1 and web2 only; db1 is 403 `out_of_scope` to show, exec or read history,
    and its refused exec records nothing."""
    web = await new_key(api, "web-ops", "operate", scope={"role": "web"})
    listed = await api.client.get("/api/hosts", headers=web)
    assert sorted(h["id"] for h in listed.json()) == ["web1", "web2"]
    agents = await api.client.get("/api/agents", headers=web)
    assert agents.status_code == 200
    assert_forbidden(await api.client.get("/api/hosts/db1", headers=web), "out_of_scope")
    assert_forbidden(await api.client.get("/api/hosts/10.0.0.3", headers=web), "out_of_scope")  # by address
    assert_forbidden(await api.client.get("/api/agents/db1", headers=web), "out_of_scope")
    assert_forbidden(await api.client.get("/api/hosts/db1/commands", headers=web), "out_of_scope")
    refused = await api.client.post("/api/hosts/db1/exec", json={"command": "true"}, headers=web)
    assert_forbidden(refused, "out_of_scope")
    assert "role=web" in refused.json()["detail"]
    assert await runs(api) == []
    ran = await api.client.post("/api/hosts/web2/exec", json={"command": "true", "timeout": 1}, headers=web)
    assert ran.status_code == 200, ran.text
    own = await api.client.get(f"/api/commands/{ran.json()['command_id']}", headers=web)
    assert own.status_code == 200
    # a run on db1 (by the admin) is outside the scope too
    other = await api.client.post(
        "/api/hosts/db1/exec", json={"command": "true", "timeout": 1}, headers=api.auth
    )
    assert other.status_code == 200
    assert_forbidden(
        await api.client.get(f"/api/commands/{other.json()['command_id']}", headers=web), "out_of_scope"
    )
    for path in ("stream", "cancel"):  # its output and its cancel are just as out of reach
        method = api.client.get if path == "stream" else api.client.post
        url = f"/api/commands/{other.json()['command_id']}/{path}"
        assert_forbidden(await method(url, headers=web), "out_of_scope")
    # two labels: only web2 carries both
    eu = await new_key(api, "web-eu", "read", scope={"role": "web", "dc": "eu"})
    assert [h["id"] for h in (await api.client.get("/api/hosts", headers=eu)).json()] == ["web2"]
    assert (await api.client.get("/api/hosts/nope", headers=web)).status_code == 404
    # a deleted host's history is outside every scope (its labels are gone with it)
    assert (await api.client.delete("/api/hosts/web2", headers=api.auth)).status_code == 204
    gone = await api.client.get(f"/api/commands/{ran.json()['command_id']}", headers=web)
    assert_forbidden(gone, "out_of_scope")
    assert (
        await api.client.get(f"/api/commands/{ran.json()['command_id']}", headers=api.auth)
    ).status_code == 200


async def test_job_selection_outside_the_scope_is_refused_before_recording(api: RunningApi) -> None:
    """`auth.check_hosts`, which the jobs route calls with its resolved selection: any host outside the
    scope refuses the whole selection (403, the hosts named), an in-scope selection passes."""
    from starlette.requests import Request

    from services.api.errors import Forbidden
    from services.api.http.auth import check_hosts
    from services.api.http.deps import KeyInfo

    def request_of(key: KeyInfo) -> Request:
        return Request({"type": "http", "state": {"api_key": key.name, "api_key_info": key}})

    web = KeyInfo("web-ops", KeyRole.OPERATE, {"role": "web"})
    selection = list(HOSTS.items())  # what {"all": true} resolves to
    with pytest.raises(Forbidden) as refused:
        check_hosts(request_of(web), selection)
    assert refused.value.code == "out_of_scope"
    assert refused.value.extra["hosts"] == ["db1"]
    check_hosts(request_of(web), selection[:2])  # {"labels": {"role": "web"}}
    check_hosts(request_of(KeyInfo("ops", KeyRole.OPERATE)), selection)  # unscoped

    # through the route: {"all": true} reaches db1 → 403 naming it, nothing recorded; the key's own label
    # selection is a job, which the key then sees; an admin's job is out of its reach
    key = await new_key(api, "web-jobs", "operate", scope={"role": "web"})
    everything = {"command": "true", "timeout": 1, "targets": {"all": True}}
    refused_job = await api.client.post("/api/jobs", json=everything, headers=key)
    assert_forbidden(refused_job, "out_of_scope")
    assert refused_job.json()["hosts"] == ["db1"]
    assert await runs(api) == []
    assert (await api.client.get("/api/jobs", headers=api.auth)).json() == []
    mine = {**everything, "targets": {"labels": {"role": "web"}}}
    created = await api.client.post("/api/jobs", json=mine, headers=key)
    assert created.status_code == 202, created.text
    listed = await api.client.get("/api/jobs", headers=key)
    assert [j["job_id"] for j in listed.json()] == [created.json()["job_id"]]
    theirs = await api.client.post("/api/jobs", json=everything, headers=api.auth)
    assert theirs.status_code == 202, theirs.text
    seen = await api.client.get(f"/api/jobs/{theirs.json()['job_id']}", headers=key)
    assert_forbidden(seen, "out_of_scope")
    cancel = await api.client.post(f"/api/jobs/{theirs.json()['job_id']}/cancel", headers=key)
    assert_forbidden(cancel, "out_of_scope")
    assert [j["job_id"] for j in (await api.client.get("/api/jobs", headers=key)).json()] == [
        created.json()["job_id"]
    ]


# ----------------------------------------------------------------------------- expiry, revocation


async def test_expired_key_is_401_with_a_clear_body_even_when_cached(api: RunningApi) -> None:
    """A key with expires_in 1 works, then (cached or not) answers 401 `key_expired` naming the time."""
    short = await new_key(api, "short", "read", expires_in=1)
    assert (await api.client.get("/api/hosts", headers=short)).status_code == 200  # cached from here on
    await asyncio.sleep(1.1)
    expired = await api.client.get("/api/hosts", headers=short)
    assert expired.status_code == 401
    assert expired.json()["code"] == "key_expired"
    assert "short" in expired.json()["detail"]
    assert "expired at" in expired.json()["detail"]
    assert expired.headers["www-authenticate"] == "Bearer"
    listed = {k["name"]: k for k in (await api.client.get("/api/keys", headers=api.auth)).json()}
    assert listed["short"]["state"] == "expired"


async def test_revoked_key_is_401_at_once_here_and_within_the_cache_ttl_elsewhere(
    api: RunningApi, tmp_path: Path, nats_server: NatsServer, database: str
) -> None:
    """Two API instances on one database, a 1 s key cache: the key (cached by both) is refused by the
    revoking instance on the next request and by the other within 1 s (+ scheduling)."""
    ttl = 1.0
    api.state.auth_cache.ttl = ttl
    other_settings = api_settings(tmp_path / "b", nats_server.url, database, auth_cache_ttl=ttl)
    async with running_api(other_settings) as other:
        doomed = await new_key(api, "doomed", "operate")
        for instance in (api, other):  # both cache it
            assert (await instance.client.get("/api/hosts", headers=doomed)).status_code == 200
        revoked = await api.client.delete("/api/keys/doomed", headers=api.auth)
        assert revoked.status_code == 200
        assert revoked.json()["state"] == "revoked"
        started = time.monotonic()
        here = await api.client.get("/api/hosts", headers=doomed)
        assert here.status_code == 401
        assert here.json()["code"] == "key_revoked"
        while (await other.client.get("/api/hosts", headers=doomed)).status_code == 200:
            assert time.monotonic() - started < ttl + 0.5, "still accepted past the cache TTL"
            await asyncio.sleep(0.05)
        refused = await other.client.get("/api/hosts", headers=doomed)
        assert refused.status_code == 401
        assert refused.json()["code"] == "key_revoked"
    again = await api.client.delete("/api/keys/doomed", headers=api.auth)
    assert again.status_code == 200
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]  # the first time is kept


# ----------------------------------------------------------------------------- keys CRUD


async def test_keys_crud_and_bad_input(api: RunningApi) -> None:
    """Create (201, the key once, Location), show, list; bad role, scope, name, expiry → 422; a taken
    name (revoked too) → 409; unknown → 404. Nothing bad is stored."""
    created = await api.client.post(
        "/api/keys",
        json={"name": "ci.deploy", "role": "operate", "scope": {"role": "web"}, "expires_in": 3600},
        headers=api.auth,
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert created.headers["location"] == "/api/keys/ci.deploy"
    assert len(body["key"]) == 64
    assert (body["name"], body["role"], body["scope"], body["state"]) == (
        "ci.deploy",
        "operate",
        {"role": "web"},
        "active",
    )
    expires = datetime.fromisoformat(body["expires_at"])
    assert abs((expires - datetime.now(UTC)) - timedelta(hours=1)) < timedelta(seconds=30)
    shown = await api.client.get("/api/keys/ci.deploy", headers=api.auth)
    assert shown.status_code == 200
    assert "key" not in shown.json()
    at = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert (
        await api.client.post(
            "/api/keys", json={"name": "k2", "role": "read", "expires_at": at}, headers=api.auth
        )
    ).status_code == 201

    bad_bodies: list[dict[str, Any]] = [
        {"name": "x1", "role": "root"},
        {"name": "x1"},
        {"name": "x1", "role": "read", "scope": {}},
        {"name": "x1", "role": "read", "scope": {"role": 5}},
        {"name": "x1", "role": "read", "scope": ["role=web"]},
        {"name": "x1", "role": "read", "scope": {"": "web"}},
        {"name": "x1", "role": "admin", "scope": {"role": "web"}},
        {"name": "x1", "role": "read", "expires_in": 0},
        {"name": "x1", "role": "read", "expires_in": 60, "expires_at": at},
        {"name": "x1", "role": "read", "expires_at": "2001-01-01T00:00:00Z"},
        {"name": "x1", "role": "read", "expires_at": "2099-01-01T00:00:00"},
        {"name": "x1", "role": "read", "expires_at": "soon"},
        {"name": "x1", "role": "read", "extra": 1},
        {"name": "", "role": "read"},
        {"name": "bad name", "role": "read"},
        {"name": "x" * 65, "role": "read"},
        {"name": "-x", "role": "read"},
    ]
    for bad in bad_bodies:
        answer = await api.client.post("/api/keys", json=bad, headers=api.auth)
        assert answer.status_code == 422, (bad, answer.text)
        assert isinstance(answer.json()["detail"], (str, list)), answer.text
    duplicate = await api.client.post(
        "/api/keys", json={"name": "ci.deploy", "role": "read"}, headers=api.auth
    )
    assert duplicate.status_code == 409
    assert "exists" in duplicate.json()["detail"]
    assert (await api.client.delete("/api/keys/ci.deploy", headers=api.auth)).status_code == 200
    reused = await api.client.post("/api/keys", json={"name": "ci.deploy", "role": "read"}, headers=api.auth)
    assert reused.status_code == 409  # a revoked key's name is kept
    for unknown in (
        api.client.get("/api/keys/nope", headers=api.auth),
        api.client.delete("/api/keys/nope", headers=api.auth),
    ):
        answer = await unknown
        assert answer.status_code == 404
        assert "nope" in answer.json()["detail"]
    names = [k["name"] for k in (await api.client.get("/api/keys", headers=api.auth)).json()]
    assert names == ["bootstrap", "ci.deploy", "k2"]


# ----------------------------------------------------------------------------- rate limits


async def test_rate_limit_answers_429_with_retry_after_per_key_and_kind(
    tmp_path: Path, nats_server: NatsServer, database: str
) -> None:
    """Exec bucket of 3 at 60/min: the fourth exec is 429 with Retry-After and a JSON body, records
    nothing, and leaves reads and other keys alone; after Retry-After seconds it passes again."""
    settings = api_settings(
        tmp_path,
        nats_server.url,
        database,
        exec_rate_limit_per_minute=60,
        exec_rate_limit_burst=3,
        exec_grace=0.2,
    )
    async with running_api(settings) as api:
        body = {"id": "h1", "address": "10.0.0.1", "ssh_check": False}
        assert (await api.client.post("/api/hosts", json=body, headers=api.auth)).status_code == 201
        ops = await new_key(api, "ops", "operate")
        ops2 = await new_key(api, "ops2", "operate")  # the bootstrap key's third non-GET
        exec_body = {"command": "true", "timeout": 1}
        for _ in range(3):
            assert (
                await api.client.post("/api/hosts/h1/exec", json=exec_body, headers=ops)
            ).status_code == 200
        limited = await api.client.post("/api/hosts/h1/exec", json=exec_body, headers=ops)
        assert limited.status_code == 429, limited.text
        retry = int(limited.headers["retry-after"])
        assert 1 <= retry <= 60
        assert limited.json()["code"] == "rate_limited"
        assert limited.json()["retry_after"] == retry
        assert "ops" in limited.json()["detail"]
        assert len(await runs(api)) == 3
        assert (await api.client.get("/api/hosts", headers=ops)).status_code == 200  # reads: own bucket
        assert (await api.client.post("/api/hosts/h1/exec", json=exec_body, headers=ops2)).status_code == 200
        await asyncio.sleep(retry)
        assert (await api.client.post("/api/hosts/h1/exec", json=exec_body, headers=ops)).status_code == 200


# ----------------------------------------------------------------------------- the offline CLI


async def test_cli_api_key_create_with_role_scope_and_expiry(
    tmp_path: Path,
    nats_server: NatsServer,
    database: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`warlock api-key create --role --scope --expires` stores them; bad input exits 1 with a message,
    and the default stays an unscoped admin key."""
    monkeypatch.setenv("WARLOCK_API_DATABASE_URL", database)

    async def cli(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(cli_main, list(argv))
        out, err = capsys.readouterr()
        return code, out.strip(), err

    code, key, _ = await cli(
        "api-key", "create", "--name", "web", "--role", "operate", "--scope", "role=web", "--expires", "2h"
    )
    assert code == 0
    assert len(key) == 64
    code, _, _ = await cli("api-key", "create", "--name", "root")
    assert code == 0
    for argv, message in (
        (("--name", "x", "--role", "read", "--scope", "role"), "KEY=VALUE"),
        (("--name", "x", "--scope", "role=web"), "admin keys cannot be scoped"),
        (("--name", "x", "--role", "read", "--expires", "yesterday"), "duration"),
        (("--name", "x", "--role", "read", "--expires", "2001-01-01T00:00:00Z"), "past"),
        (("--name", "bad name", "--role", "read"), "bad key name"),
    ):
        code, _, err = await cli("api-key", "create", *argv)
        assert code == 1, argv
        assert message in err, (argv, err)
    async with running_api(api_settings(tmp_path, nats_server.url, database)) as api:
        async with api.state.sessions() as session:
            keys = {k.name: k for k in (await session.exec(select(ApiKey))).all()}
        assert sorted(keys) == ["root", "web"]
        assert (keys["web"].role, keys["web"].scope) == ("operate", {"role": "web"})
        assert keys["web"].expires_at is not None
        assert (
            timedelta(hours=1, minutes=59) < keys["web"].expires_at - datetime.now(UTC) <= timedelta(hours=2)
        )
        assert (keys["root"].role, keys["root"].scope, keys["root"].expires_at) == ("admin", None, None)
        listed = await api.client.get("/api/hosts", headers={"Authorization": f"Bearer {key}"})
        assert listed.status_code == 200


async def test_a_key_row_with_an_unknown_role_is_refused_not_a_500(api: RunningApi) -> None:
    """A row edited by hand to a role this API does not know answers 401 `bad_key`, never a 500."""
    odd = await new_key(api, "odd", "read")
    async with api.state.sessions() as session:
        row = (await session.exec(select(ApiKey).where(ApiKey.name == "odd"))).one()
        row.role = "root"  # type: ignore[assignment]
        session.add(row)
        await session.commit()
    refused = await api.client.get("/api/hosts", headers=odd)
    assert refused.status_code == 401
    assert refused.json()["code"] == "bad_key"
