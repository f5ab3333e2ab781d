"""One exception tree for everything in `shared/` and the services built on it.

    WarlockError
    ├── ConfigError          a configuration value is wrong; names the field
    ├── ProtocolError        a frame or payload could not be decoded; carries the close code
    ├── InvalidIdError       a host or command id does not match its pattern
    └── RemoteError          a peer answered with a typed error reply (code, description)

Third-party errors are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class CloseCode(IntEnum):
    """WebSocket close codes the gateway and agent use (README: "Close codes")."""

    NORMAL = 1000
    GOING_AWAY = 1001  # gateway shutting down: reconnect, preferably elsewhere
    INVALID_DATA = 1007  # frame is not valid JSON / UTF-8
    POLICY_VIOLATION = 1008  # unknown frame type, bad fields, wrong order, host mismatch
    MESSAGE_TOO_BIG = 1009  # frame larger than the negotiated maximum
    INTERNAL_ERROR = 1011
    SUPERSEDED = 4000  # a newer session for the same host took over
    AUTH_TIMEOUT = 4001  # no hello frame within the auth timeout
    PING_TIMEOUT = 4002  # nothing received within ping interval + ping timeout
    TOKEN_REVOKED = 4003  # the token this session used is no longer valid
    SEND_TIMEOUT = 4004  # the agent took no frame within the gateway's send timeout (it stopped reading)


class ErrorCode(StrEnum):
    """Codes of typed error replies on NATS and of agent-side exec errors."""

    BAD_REQUEST = "bad_request"  # the request did not validate; nothing ran
    UNAUTHORIZED = "unauthorized"
    BUSY = "busy"  # over the in-flight limit; nothing ran, safe to retry
    TIMEOUT = "timeout"  # no result in time; the command may have run
    DISCONNECTED = "disconnected"  # the agent left with the command in flight; it may have run
    UNKNOWN_RESULT = "unknown_result"  # the id ran before but its result was lost; not run again
    EXEC_FAILED = "exec_failed"  # the command could not be started
    UNAVAILABLE = "unavailable"  # a dependency (token authority, shutdown) is unavailable; nothing ran
    NOT_FOUND = "not_found"  # no such host (e.g. SSH target lookup)
    CONNECT_FAILED = "connect_failed"  # SSH: host unreachable or refused; nothing ran
    AUTH_FAILED = "auth_failed"  # SSH: authentication refused; nothing ran
    HOST_KEY_MISMATCH = "host_key_mismatch"  # SSH: host key is not the pinned one; nothing ran
    UNSIGNED = "unsigned"  # a command that changes a host came without a signature; nothing ran
    UNKNOWN_KEY = "unknown_key"  # signed by a key the host (or the API) does not trust; nothing ran
    BAD_SIGNATURE = "bad_signature"  # the signature does not cover what arrived (tampered); nothing ran
    WRONG_HOST = "wrong_host"  # signed for another host; nothing ran
    EXPIRED = "expired"  # past its not-after (or valid for too long); nothing ran
    REPLAY = "replay"  # this command id already ran here; nothing ran again
    FORBIDDEN = "forbidden"  # the signer may not do this (e.g. a revoked operator key); nothing ran
    INTERNAL = "internal"


# After an error reply with one of these codes the command certainly did not run: the caller may record
# it as failed (and a client may retry).
NOTHING_RAN = frozenset(
    {
        ErrorCode.BAD_REQUEST,
        ErrorCode.UNAUTHORIZED,
        ErrorCode.BUSY,
        ErrorCode.EXEC_FAILED,
        ErrorCode.UNAVAILABLE,
        ErrorCode.NOT_FOUND,
        ErrorCode.CONNECT_FAILED,
        ErrorCode.AUTH_FAILED,
        ErrorCode.HOST_KEY_MISMATCH,
        ErrorCode.UNSIGNED,
        ErrorCode.UNKNOWN_KEY,
        ErrorCode.BAD_SIGNATURE,
        ErrorCode.WRONG_HOST,
        ErrorCode.EXPIRED,
        ErrorCode.REPLAY,
        ErrorCode.FORBIDDEN,
        ErrorCode.INTERNAL,
    }
)
# After these the command may have run: its outcome is unknown and it is never re-sent.
MAY_HAVE_RUN = frozenset({ErrorCode.TIMEOUT, ErrorCode.DISCONNECTED, ErrorCode.UNKNOWN_RESULT})


class WarlockError(Exception):
    """Base of every error Warlock raises on purpose."""


class ConfigError(WarlockError):
    """A configuration value is invalid; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"config error: {field}: {message}")
        self.field = field
        self.message = message


class ProtocolError(WarlockError):
    """A frame or payload could not be decoded; `close_code` says how to close the connection."""

    def __init__(self, close_code: CloseCode, message: str) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.message = message


class InvalidIdError(WarlockError, ValueError):
    """An id does not match its pattern."""


class RemoteError(WarlockError):
    """A peer answered with a typed error reply."""

    def __init__(self, code: ErrorCode, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description
