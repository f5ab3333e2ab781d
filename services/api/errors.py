"""Errors the API raises on purpose, each with the HTTP status it answers.

    ApiError (a WarlockError)            status, detail
    ├── NotFound                         404: unknown host or command
    ├── Conflict                         409: duplicate host id or address; no pinned key; no systemd
    ├── SshCheckFailed                   422: the SSH worker could not reach or log in to the host (code)
    ├── RemoteFailed                     502: the SSH worker answered with another typed error (code)
    ├── RemoteTimeout                    504: the SSH worker took too long; the operation may have run
    ├── DependencyUnavailable            503
    │   ├── DatabaseUnavailable          the database cannot be reached or is not initialised
    │   ├── WorkerUnavailable            no SSH worker answered
    │   ├── NatsUnavailable              NATS is not connected (at start, or reconnecting)
    │   └── WheelUnavailable (wheel.py)  the agent wheel could not be read or built
    └── Unauthorized                     401: missing or unknown API key

Database driver errors are translated to DatabaseUnavailable by the exception handlers in `main`.
"""

from __future__ import annotations

from typing import Any

from shared.errors import WarlockError


class ApiError(WarlockError):
    """Base: `status` is the HTTP status, `detail` the JSON body's detail."""

    status = 500

    def __init__(self, detail: str, code: str | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.extra = extra or {}  # more JSON fields of the error body (e.g. install steps)


class NotFound(ApiError):
    """No such host or command."""

    status = 404


class Conflict(ApiError):
    """Duplicate id or address."""

    status = 409


class SshCheckFailed(ApiError):
    """The worker reached (or failed to reach) the host and said why."""

    status = 422


class RemoteFailed(ApiError):
    """The SSH worker reached the host but the operation failed there (typed error code)."""

    status = 502


class RemoteTimeout(ApiError):
    """No answer in time: the operation may have run."""

    status = 504


class Unauthorized(ApiError):
    """Missing or unknown API key."""

    status = 401


class DependencyUnavailable(ApiError):
    """A dependency (database, NATS worker) is unavailable; retry later."""

    status = 503


class DatabaseUnavailable(DependencyUnavailable):
    """The database cannot be reached or its schema is not initialised yet."""


class WorkerUnavailable(DependencyUnavailable):
    """No worker answered on NATS."""


class NatsUnavailable(DependencyUnavailable):
    """NATS is not connected: nothing was sent."""
