"""The API's edge: what every HTTP request meets before FastAPI reads a byte of its body.

    client ─▶ JsonServerErrors (main) ─▶ ApiEdge ─▶ FastAPI: routing, body parsing, handlers
                                          │
                                          ├─ /api/...: Authorization: Bearer <key> checked first
                                          │            missing / unknown → 401, database not ready → 503
                                          └─ Content-Length over max_body_bytes → 413, body never read;
                                             a chunked body is counted as it arrives → 413 once over

A pure ASGI middleware (no ``BaseHTTPMiddleware``: it costs a task and a stream per request), so the exec
path pays one scan of the headers and the key check it paid before. Exceptions raised here never reach
FastAPI's handlers, so the edge answers its own refusals as JSON. A refusal sent before an announced body
was read carries ``Connection: close``: the server does not go on receiving a body it refused. (Clients
that send ``Expect: 100-continue``, as curl does for large bodies, never send it at all.)

The verified key's name is left in ``scope["state"]["api_key"]``, where ``request.state.api_key`` (and
`deps.api_key_name`) finds it, and its role and scope in ``scope["state"]["api_key_info"]``
(`deps.api_key_info`), where each route's role declaration (`services.api.http.auth`) checks them.
"""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import DependencyUnavailable, DomainError
from services.api.http.deps import ApiState, verify_api_key
from services.api.http.errors import CLOSE, error_response

log = logging.getLogger(__name__)


class BodyTooLarge(HTTPException):
    """A chunked body grew past the limit while the app read it (FastAPI answers it as JSON 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes", headers=CLOSE)


def too_large(limit: int) -> JSONResponse:
    """413, before reading a body whose Content-Length is over `limit`."""
    return JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413, headers=CLOSE)


def counting(receive: Receive, limit: int) -> Receive:
    """`receive`, raising `BodyTooLarge` once more than `limit` body bytes have arrived."""
    received = 0

    async def receive_counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_counted


def is_protected(path: str) -> bool:
    """Whether `path` needs an API key (everything under ``/api``)."""
    return path.startswith("/api/") or path == "/api"


class ApiEdge:
    """Checks the API key of ``/api`` requests and the body size of every request, before the app runs."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse (401, 503, 413, 400) or run the app, with the key name in the request's state."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorization = b""
        length: bytes | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        has_body = chunked or (length is not None and length.strip() != b"0")
        if is_protected(scope["path"]):
            refusal = await self._authenticate(scope, authorization.decode("latin-1"), close=has_body)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        if length is not None:
            # the HTTP server delivers exactly Content-Length bytes: the header alone decides
            size = int(length) if length.strip().isdigit() else -1
            if size > self.max_body_bytes or size < 0:
                bad = too_large(self.max_body_bytes) if size >= 0 else self._bad_length()
                await bad(scope, receive, send)
                return
        elif chunked:
            receive = counting(receive, self.max_body_bytes)
        await self.app(scope, receive, send)

    @staticmethod
    def _bad_length() -> JSONResponse:
        return JSONResponse({"detail": "invalid Content-Length"}, status_code=400, headers=CLOSE)

    async def _authenticate(self, scope: Scope, authorization: str, close: bool) -> JSONResponse | None:
        """None when the key is valid (its name left in the scope's state), else the refusal to send."""
        state: ApiState | None = getattr(scope["app"].state, "api", None)
        try:
            if state is None:
                raise DependencyUnavailable("the API is starting")
            key = await verify_api_key(state, authorization)
        except DomainError as exc:
            return error_response(exc, close=close)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("API key check: database unavailable: %s", type(exc).__name__)
            headers = CLOSE if close else None
            return JSONResponse({"detail": "database unavailable"}, status_code=503, headers=headers)
        scope.setdefault("state", {})["api_key"] = key.name
        scope["state"]["api_key_info"] = key  # role, scope, expiry: `services.api.http.auth`
        return None
