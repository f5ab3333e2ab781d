"""The SSH worker's exceptions; each carries the `ErrorCode` of the typed reply it becomes.

    WarlockError (shared.errors)
    └── SshError                 code, description; the worker replies `error(code, description)`
        ├── ConnectFailed        unreachable, refused, timed out, handshake failed; nothing ran
        ├── AuthFailed           the host refused the worker's key; nothing ran
        ├── HostKeyMismatch      the host's key is not the pinned one; nothing ran
        ├── TargetRefused        the target cannot be used as given (no pinned key, bad key); nothing ran
        ├── Busy                 no free channel for the host in time; nothing ran
        ├── ExecFailed           the host refused to start the command; nothing ran
        ├── Disconnected         the connection was lost with the command in flight; it may have run
        ├── InvalidRequest       an agent operation request is unusable (e.g. wheel digest); nothing sent
        ├── ScriptFailed         an install/configure/uninstall script failed without a final state
        └── OpTimedOut           an agent operation did not finish in time; it may have partly run

asyncssh and OS errors are translated here, at the boundary, with ``raise ... from exc``.
"""

from __future__ import annotations

import asyncssh

from shared.errors import ErrorCode, WarlockError


class SshError(WarlockError):
    """Base of the worker's errors: `code` and `description` make the typed error reply."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, description: str, code: ErrorCode | None = None) -> None:
        super().__init__(description)
        self.description = description[:4096]
        if code is not None:
            self.code = code


class ConnectFailed(SshError):
    """The host could not be reached or the SSH handshake failed; nothing ran."""

    code = ErrorCode.CONNECT_FAILED


class AuthFailed(SshError):
    """The host refused the worker's key; nothing ran."""

    code = ErrorCode.AUTH_FAILED


class HostKeyMismatch(SshError):
    """The host presented a key other than the pinned one; nothing ran."""

    code = ErrorCode.HOST_KEY_MISMATCH


class TargetRefused(SshError):
    """The target is unusable as given (no pinned host key, unparsable key); nothing ran."""

    code = ErrorCode.BAD_REQUEST


class Busy(SshError):
    """Every channel to the host stayed in use for the whole queue timeout; nothing ran."""

    code = ErrorCode.BUSY


class ExecFailed(SshError):
    """The host refused to open a session or start the command; nothing ran."""

    code = ErrorCode.EXEC_FAILED


class Disconnected(SshError):
    """The connection was lost with the command in flight; it may have run."""

    code = ErrorCode.DISCONNECTED


class InvalidRequest(SshError):
    """An agent operation request cannot be carried out as given; nothing was sent to the host."""

    code = ErrorCode.BAD_REQUEST


class ScriptFailed(SshError):
    """An agent install/configure/uninstall script failed (a step failed, or it ended without a STATE)."""

    code = ErrorCode.EXEC_FAILED


class OpTimedOut(SshError):
    """An agent operation did not finish within its timeout; it may have partly run on the host."""

    code = ErrorCode.TIMEOUT


def connect_error(exc: BaseException, where: str) -> SshError:
    """Translate an exception raised while connecting to `where` into the matching SshError."""
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return HostKeyMismatch(f"{where}: host key does not match the pinned key")
    if isinstance(exc, asyncssh.PermissionDenied):
        return AuthFailed(f"{where}: authentication refused for the worker's key")
    if isinstance(exc, asyncssh.KeyExchangeFailed) and "host key" in str(exc).lower():
        return HostKeyMismatch(f"{where}: host offers no key of the pinned type")
    if isinstance(exc, TimeoutError):
        return ConnectFailed(f"{where}: connection timed out")
    if isinstance(exc, asyncssh.Error):
        return ConnectFailed(f"{where}: SSH handshake failed: {exc.reason}")
    if isinstance(exc, OSError):
        return ConnectFailed(f"{where}: {exc.strerror or exc}")
    return ConnectFailed(f"{where}: {type(exc).__name__}: {exc}")
