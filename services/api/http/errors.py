"""Domain errors → HTTP: the one place a status code is chosen for what went wrong.

    domain error (services.api.errors)   status
    NotFound                             404
    Conflict                             409
    SshCheckFailed                       422
    RemoteFailed                         502
    RemoteTimeout                        504
    DependencyUnavailable (and kin)      503   database, SSH worker, NATS, agent wheel
    Unauthorized                         401   with ``WWW-Authenticate: Bearer``
    Forbidden                            403   outside the key's role or scope
    RateLimited                          429   with ``Retry-After`` (seconds)

The body is ``{"detail": ..., "code": ...}`` plus the error's extra fields. Database driver errors that
escape a handler answer 409 (an integrity error) or 503, and connection errors 503; bad input answers 422
(`validation`). `install_error_handlers` puts all of it on the app; the edge (`edge.ApiEdge`) answers its
own refusals with the same `error_response`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from services.api.errors import (
    Conflict,
    DependencyUnavailable,
    DomainError,
    Forbidden,
    NotFound,
    RateLimited,
    RemoteFailed,
    RemoteTimeout,
    SshCheckFailed,
    Unauthorized,
)
from services.api.http.validation import request_validation_error

log = logging.getLogger("services.api")

CLOSE = {"Connection": "close"}

STATUS: dict[type[DomainError], int] = {
    NotFound: 404,
    Conflict: 409,
    SshCheckFailed: 422,
    RemoteFailed: 502,
    RemoteTimeout: 504,
    Unauthorized: 401,
    DependencyUnavailable: 503,
    Forbidden: 403,
    RateLimited: 429,
}


def status_of(exc: DomainError) -> int:
    """The HTTP status of a domain error: its own class's, else its nearest ancestor's, else 500."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(exc: DomainError) -> dict[str, object]:
    """The JSON body of a domain error: ``detail``, ``code`` when set, and its extra fields."""
    body: dict[str, object] = {"detail": exc.detail}
    if exc.code is not None:
        body["code"] = exc.code
    body.update((k, v) for k, v in exc.extra.items() if k not in body)
    return body


def error_response(exc: DomainError, close: bool = False) -> JSONResponse:
    """The response to a domain error (401 with ``WWW-Authenticate: Bearer``)."""
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    if close:
        headers.update(CLOSE)
    return JSONResponse(error_body(exc), status_code=status_of(exc), headers=headers)


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return error_response(exc)


async def _integrity_error(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("integrity error: %s", type(exc).__name__)
    return JSONResponse({"detail": "conflict with existing data"}, status_code=409)


async def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s: %s", type(exc).__name__, str(exc).splitlines()[0][:200])
    return JSONResponse({"detail": "database unavailable"}, status_code=503)


async def _os_error(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("dependency unavailable: %s: %s", type(exc).__name__, exc)
    return JSONResponse({"detail": "a dependency is unavailable (database?)"}, status_code=503)


def install_error_handlers(app: FastAPI) -> None:
    """Domain errors → their status (`STATUS`); bad input → 422 (`validation`); database and connection
    errors → 503; all as JSON."""
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, request_validation_error)
    app.add_exception_handler(IntegrityError, _integrity_error)
    app.add_exception_handler(SQLAlchemyError, _database_error)
    app.add_exception_handler(OSError, _os_error)
