"""Domain errors: what went wrong, in the API's terms; no HTTP status here.

    DomainError (a WarlockError)         detail, code, extra
    ├── NotFound                         unknown host or command
    ├── Conflict                         duplicate host id or address; no pinned key; no systemd
    ├── SshCheckFailed                   the SSH worker could not reach or log in to the host (code)
    ├── RemoteFailed                     the SSH worker answered with another typed error (code)
    ├── RemoteTimeout                    the SSH worker took too long; the operation may have run
    ├── DependencyUnavailable            retry later
    │   ├── DatabaseUnavailable          the database cannot be reached or is not initialised
    │   ├── WorkerUnavailable            no SSH worker answered
    │   ├── NatsUnavailable              NATS is not connected (at start, or reconnecting)
    │   └── WheelUnavailable (wheel.py)  the agent wheel could not be read or built
    ├── Unauthorized                     missing, unknown, expired or revoked API key
    ├── Forbidden                        outside the key's role or label scope
    └── RateLimited                      the key's rate limit is spent (retry_after seconds)

The HTTP layer alone decides what each answers (`services.api.http.errors.STATUS`), as it alone turns
database driver errors into answers.
"""

from __future__ import annotations

from typing import Any

from shared.errors import WarlockError


class DomainError(WarlockError):
    """Base: `detail` says what went wrong, `code` a machine-readable reason, `extra` more fields."""

    def __init__(self, detail: str, code: str | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.extra = extra or {}  # more JSON fields of the error body (e.g. install steps)


class NotFound(DomainError):
    """No such host or command."""


class Conflict(DomainError):
    """Duplicate id or address."""


class SshCheckFailed(DomainError):
    """The worker reached (or failed to reach) the host and said why."""


class RemoteFailed(DomainError):
    """The SSH worker reached the host but the operation failed there (typed error code)."""


class RemoteTimeout(DomainError):
    """No answer in time: the operation may have run."""


class Unauthorized(DomainError):
    """Missing or unknown API key."""


class Forbidden(DomainError):
    """The key is valid but its role or label scope does not cover this request."""


class RateLimited(DomainError):
    """The key's request budget is spent: retry after `retry_after` seconds."""

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail, code="rate_limited", extra={"retry_after": retry_after})
        self.retry_after = retry_after


class DependencyUnavailable(DomainError):
    """A dependency (database, NATS worker) is unavailable; retry later."""


class DatabaseUnavailable(DependencyUnavailable):
    """The database cannot be reached or its schema is not initialised yet."""


class WorkerUnavailable(DependencyUnavailable):
    """No worker answered on NATS."""


class NatsUnavailable(DependencyUnavailable):
    """NATS is not connected: nothing was sent."""
