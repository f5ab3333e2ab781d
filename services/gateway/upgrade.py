"""The HTTP side of the gateway: routing, ``/healthz``, and authentication before the upgrade.

A refused upgrade costs one small JSON response: no session, no NATS call for a malformed header.
"""

from __future__ import annotations

import http
import json
import logging
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from nats.aio.client import Client as NATS
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from services.gateway.auth import Authenticator, AuthorityUnavailable, Unauthorized, parse_bearer
from services.gateway.bridge import Bridge
from shared.tokens import hash_token

log = logging.getLogger("services.gateway")
AGENT_PATH = "/agent"
HEALTH_PATH = "/healthz"


def peer_of(conn: ServerConnection) -> str:
    """``ip:port`` of the connection's peer."""
    peer = conn.remote_address
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def json_response(conn: ServerConnection, status: http.HTTPStatus, body: dict[str, Any]) -> Response:
    """An HTTP response with a small JSON body (sent instead of upgrading)."""
    response = conn.respond(status, json.dumps(body) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


@dataclass(frozen=True, slots=True)
class Credentials:
    """How a connection authenticated: its token's hash and when the check began (the cache's clock)."""

    token_sha256: str
    checked_at: float


class UpgradeGate:
    """The ``process_request`` hook: route by path, answer health checks, authenticate agents."""

    def __init__(self, nc: NATS, bridge: Bridge, auth: Authenticator) -> None:
        self.nc = nc
        self.bridge = bridge
        self.auth = auth
        self._credentials: weakref.WeakKeyDictionary[ServerConnection, Credentials] = (
            weakref.WeakKeyDictionary()
        )

    def credentials(self, conn: ServerConnection) -> Credentials | None:
        """How `conn` authenticated at its upgrade (None if it did not pass this gate)."""
        return self._credentials.get(conn)

    async def __call__(self, conn: ServerConnection, request: Request) -> Response | None:
        """Return a Response to refuse the upgrade, None to accept it (``conn.username`` = host id)."""
        path = urlsplit(request.path).path
        if path == HEALTH_PATH:
            return self.healthz(conn)
        if path != AGENT_PATH:
            return json_response(conn, http.HTTPStatus.NOT_FOUND, {"error": "not_found"})
        if self.bridge.stopping:
            return json_response(conn, http.HTTPStatus.SERVICE_UNAVAILABLE, {"error": "shutting_down"})
        values = request.headers.get_all("Authorization")
        token = parse_bearer(values[0]) if len(values) == 1 else None
        if token is None:
            log.info("rejected %s: missing or malformed bearer token", peer_of(conn))
            return json_response(conn, http.HTTPStatus.UNAUTHORIZED, {"error": "unauthorized"})
        checked_at = self.auth.cache.now()
        try:
            host = await self.auth.host_for(token)
        except Unauthorized as exc:
            log.info("rejected %s: %s", peer_of(conn), exc)
            return json_response(conn, http.HTTPStatus.UNAUTHORIZED, {"error": "unauthorized"})
        except AuthorityUnavailable as exc:
            log.warning("rejected %s: %s", peer_of(conn), exc)
            return json_response(conn, http.HTTPStatus.SERVICE_UNAVAILABLE, {"error": "unavailable"})
        conn.username = host  # websockets' attribute for the authenticated identity
        self._credentials[conn] = Credentials(hash_token(token), checked_at)
        return None

    def healthz(self, conn: ServerConnection) -> Response:
        """``/healthz``: 200 while NATS is connected, 503 otherwise."""
        up = self.nc.is_connected
        body = {
            "status": "ok" if up else "degraded",
            "gateway_id": self.bridge.gateway_id,
            "sessions": len(self.bridge.sessions),
            "nats": "connected" if up else "disconnected",
        }
        return json_response(conn, http.HTTPStatus.OK if up else http.HTTPStatus.SERVICE_UNAVAILABLE, body)
