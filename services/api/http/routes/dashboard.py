"""The dashboard: ``GET /`` (the page), ``/ui/<file>`` (its scripts and styles) and ``GET /api/fleet``.

The page and its files are served by the API itself, without an API key (they hold no data) and without a
CDN: HTML, ``warlock-socket.js`` (the browser stream's client), ``dashboard.js`` and ``dashboard.css``
under ``services/api/http/static/dashboard/``. Only the files named in `FILES` are reachable. The page
carries a Content-Security-Policy allowing scripts, styles and connections to its own origin only (no
inline script): the API key the operator types is kept in ``sessionStorage`` and sent only in the
``Authorization`` header of ``fetch`` calls, never in a URL.

``GET /api/fleet`` (read role, scope-filtered, ``?label=k=v``) is the host list's model: one row per host
with its presence, agent session and latest metrics sample, built with three queries whatever the number
of hosts (hosts, agent connections, the latest sample of each host).
"""

from __future__ import annotations

import functools
import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel
from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.http.auth import READ
from services.api.http.deps import SessionDep
from services.api.http.routes.hosts import LabelQuery, visible_hosts
from services.api.store import crud
from services.api.store.models import AgentStatus, Host

STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "dashboard"
UI_PREFIX = "/ui"
FILES = {  # name → content type: nothing else under the directory is served
    "index.html": "text/html; charset=utf-8",
    "warlock-socket.js": "text/javascript; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# 'self' only; connect-src names ws:/wss: of this origin too, as CSP Level 2 browsers need it spelled out
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' {ws}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
CACHE_CONTROL = "no-cache"  # revalidated every time (ETag): a new release is seen at once

# the latest sample's columns in a fleet row (``rtt_ms``: the gateway ⇄ agent keepalive round trip)
SAMPLE_COLUMNS = ("cpu", "mem", "disk", "rtt_ms")

router = APIRouter(include_in_schema=False)
api_router = APIRouter(tags=["dashboard"])


class FleetRow(BaseModel):
    """One host as the dashboard lists it."""

    id: str
    address: str
    labels: dict[str, str]
    presence: Literal["agent", "ssh", "offline"]  # agent connected; else a pinned SSH key; else offline
    ssh_fallback: bool  # an SSH host key is pinned: without an agent, commands go over SSH
    agent_version: str | None
    gateway_id: str | None
    connected_at: datetime | None
    last_ping: datetime | None
    rtt_ms: float | None  # gateway ⇄ agent keepalive round trip of the latest sample (null: not measured)
    cpu: float | None  # percent, latest sample
    mem: float | None  # percent
    disk: float | None  # percent of the fullest filesystem
    sampled_at: datetime | None  # the latest sample's time


@functools.cache
def _file(name: str) -> tuple[bytes, str]:
    body = (STATIC_DIR / name).read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _serve(name: str, request: Request, headers: dict[str, str] | None = None) -> Response:
    body, etag = _file(name)
    sent = {
        "ETag": etag,
        "Cache-Control": CACHE_CONTROL,
        "X-Content-Type-Options": "nosniff",
        **(headers or {}),
    }
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=sent)
    return Response(body, media_type=FILES[name], headers=sent)


def page_csp(request: Request) -> str:
    """The page's Content-Security-Policy: its own origin, and the WebSocket to the same host."""
    host = request.headers.get("host", "")
    scheme = "wss" if request.url.scheme == "https" else "ws"
    safe = all(c.isalnum() or c in ".-:[]" for c in host) and host != ""
    return CSP.format(ws=f"{scheme}://{host}" if safe else "").replace("'self' ;", "'self';")


@router.get("/")
async def dashboard_page(request: Request) -> Response:
    """The dashboard (no API key: the page asks for one and keeps it in sessionStorage)."""
    headers = {
        "Content-Security-Policy": page_csp(request),
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }
    return _serve("index.html", request, headers)


@router.get(UI_PREFIX + "/{name}")
async def dashboard_file(name: str, request: Request) -> Response:
    """A dashboard script or stylesheet; 404 for any name not in `FILES`."""
    if name not in FILES or name == "index.html":
        raise HTTPException(404, "no such dashboard file")
    return _serve(name, request)


def latest_samples_sql(dialect: str) -> str:
    """The latest `metric_sample` row of every host, in one statement driven by the host table: a LATERAL
    index probe per host on PostgreSQL, a correlated max on SQLite (its min/max optimisation on the primary
    key (host_id, at)). Never a scan of the whole history."""
    columns = ", ".join(f"m.{c}" for c in ("host_id", "at", *SAMPLE_COLUMNS))
    if dialect == "postgresql":
        return (
            f"SELECT {columns} FROM host h CROSS JOIN LATERAL (SELECT * FROM metric_sample s "  # noqa: S608
            "WHERE s.host_id = h.id ORDER BY s.at DESC LIMIT 1) m"
        )
    return (
        f"SELECT {columns} FROM host h CROSS JOIN metric_sample m "  # noqa: S608 - CROSS JOIN: h outer
        "WHERE m.host_id = h.id AND m.at = (SELECT max(at) FROM metric_sample WHERE host_id = h.id)"
    )


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC) if value.tzinfo is None else value


async def fleet_rows(session: AsyncSession, hosts: list[Host]) -> list[FleetRow]:
    """`hosts` as fleet rows: two more queries (agent sessions, latest samples), not one per host."""
    wanted = {h.id for h in hosts}
    agents = {a.host_id: a for a in await crud.list_agents(session) if a.host_id in wanted}
    connection = await session.connection()
    query = text(latest_samples_sql(connection.dialect.name))
    samples = {r.host_id: r for r in (await connection.execute(query)).all() if r.host_id in wanted}
    rows = []
    for host in hosts:
        agent = agents.get(host.id)
        sample = samples.get(host.id)
        connected = agent is not None and agent.status == AgentStatus.CONNECTED
        presence: Literal["agent", "ssh", "offline"] = (
            "agent" if connected else "ssh" if host.host_key else "offline"
        )
        values: dict[str, Any] = {c: getattr(sample, c, None) for c in SAMPLE_COLUMNS} if sample else {}
        rows.append(
            FleetRow(
                id=host.id,
                address=host.address,
                labels=host.labels or {},
                presence=presence,
                ssh_fallback=bool(host.host_key),
                agent_version=agent.agent_version if agent else None,
                gateway_id=agent.gateway_id if connected and agent else None,
                connected_at=_utc(agent.connected_at) if connected and agent else None,
                last_ping=_utc(agent.last_ping) if agent else None,
                rtt_ms=values.get("rtt_ms"),
                cpu=values.get("cpu"),
                mem=values.get("mem"),
                disk=values.get("disk"),
                sampled_at=datetime.fromtimestamp(sample.at, UTC) if sample else None,
            )
        )
    return rows


@api_router.get(
    "/fleet",
    response_model=list[FleetRow],
    responses={422: {"description": "malformed label"}},
    dependencies=[READ],
)
async def list_fleet(session: SessionDep, request: Request, label: LabelQuery = None) -> list[FleetRow]:
    """Every host (a scoped key: within its scope; with ``label``: matching every selector) with its
    presence (``agent`` connected, else ``ssh`` when its SSH host key is pinned, else ``offline``), agent
    session and latest metrics sample: what the dashboard lists, then keeps live over ``/api/ws``."""
    return await fleet_rows(session, await visible_hosts(session, request, label))
