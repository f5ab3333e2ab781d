"""Who may do what: every ``/api`` route declares the role it needs, here, in one place per route.

    role      may                                                        bucket (rate limit)
    read      GET: hosts, agents, commands, jobs, streams, the wheel     read
    operate   + run commands: exec, jobs, cancel                         exec (non-GET)
    admin     + hosts (add, delete), agents (install ...), API keys      exec (non-GET)

A route declares its role with one dependency: ``dependencies=[READ]`` (or `OPERATE`, `ADMIN`). The
dependency runs after the edge verified the key (`services.api.http.edge`) and before the handler, and
refuses with 403 ``{"detail", "code": "forbidden"}`` a key whose role is below the route's, then takes a
token of the key's rate limit (429 with ``Retry-After``; `services.api.http.ratelimit`). A test walks the
app's routes and fails on an ``/api`` route without a declaration (tests/integration/test_api_keys.py).

A key may also carry a label scope (``{"role": "web"}``): it sees and acts on only the hosts whose labels
include every pair of it. The routes call `check_host` (403 ``out_of_scope`` for a host outside it),
`check_hosts` (a job's whole selection, before anything is recorded) and `check_run_host` (a command
run's host); lists are filtered with `scoped` and `in_scope`.
Admin keys carry no scope: an admin can create keys, so a scope would not hold it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import Depends, Request
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.errors import Forbidden, RateLimited
from services.api.http.deps import KeyInfo, api_key_info, app_state
from services.api.store.models import Host, KeyRole

RANK = {KeyRole.READ: 0, KeyRole.OPERATE: 1, KeyRole.ADMIN: 2}
MAX_LISTED = 20  # out-of-scope hosts named in a 403 body


class RoleCheck:
    """The dependency that declares and enforces a route's role (and charges the key's rate limit)."""

    def __init__(self, role: KeyRole) -> None:
        self.role = role

    async def __call__(self, request: Request) -> None:
        key = api_key_info(request)
        if RANK[key.role] < RANK[self.role]:
            raise Forbidden(
                f"API key {key.name!r} has role {key.role.value}; {request.method} {request.url.path} "
                f"needs {self.role.value}",
                code="forbidden",
            )
        kind = "read" if request.method in ("GET", "HEAD") else "exec"
        wait = app_state(request).limiter.check(key.name, kind)
        if wait:
            raise RateLimited(f"rate limit of API key {key.name!r} ({kind}) reached: retry in {wait} s", wait)

    def __repr__(self) -> str:
        return f"RoleCheck({self.role.value})"


READ: Any = Depends(RoleCheck(KeyRole.READ))
OPERATE: Any = Depends(RoleCheck(KeyRole.OPERATE))
ADMIN: Any = Depends(RoleCheck(KeyRole.ADMIN))


def in_scope(scope: Mapping[str, str] | None, labels: Mapping[str, str] | None) -> bool:
    """Whether a host with `labels` is within `scope` (every pair of the scope among its labels)."""
    if not scope:
        return True
    labels = labels or {}
    return all(labels.get(k) == v for k, v in scope.items())


def _scope_text(scope: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(scope.items()))


def check_host(request: Request, host_id: str, labels: Mapping[str, str] | None) -> None:
    """Forbidden (403 ``out_of_scope``) when the request's key may not see or act on this host."""
    key = api_key_info(request)
    if not in_scope(key.scope, labels):
        assert key.scope is not None
        raise Forbidden(
            f"host {host_id[:100]!r} is outside the scope of API key {key.name!r} ({_scope_text(key.scope)})",
            code="out_of_scope",
        )


def check_hosts(request: Request, hosts: Iterable[tuple[str, Mapping[str, str] | None]]) -> None:
    """Forbidden (403 ``out_of_scope``, the first hosts named under ``hosts``) when any of `hosts`
    ((id, labels) pairs: a job's resolved selection) is outside the key's scope; call it before anything
    is recorded."""
    key = api_key_info(request)
    if not key.scope:
        return
    outside = [host_id for host_id, labels in hosts if not in_scope(key.scope, labels)]
    if outside:
        raise Forbidden(
            f"{len(outside)} selected host(s) are outside the scope of API key {key.name!r} "
            f"({_scope_text(key.scope)}): narrow the selection, e.g. add these labels to it",
            code="out_of_scope",
            extra={"hosts": outside[:MAX_LISTED]},
        )


async def check_run_host(request: Request, session: AsyncSession, host_id: str) -> None:
    """`check_host` for a command run's host, looked up only for a scoped key (a deleted host's runs are
    outside every scope). For ``GET /api/commands/{id}``, its stream and its cancel."""
    if scoped(request) is None:
        return
    host = await session.get(Host, host_id)
    check_host(request, host_id, host.labels if host is not None else None)


def scoped(request: Request) -> KeyInfo | None:
    """The request's key if it has a scope (lists must be filtered), else None."""
    key = api_key_info(request)
    return key if key.scope else None
