"""Names for the identifiers that cross process boundaries, and their validation."""

from __future__ import annotations

import re
import uuid
from typing import Annotated, NewType

from pydantic import StringConstraints

HostId = NewType("HostId", str)
CommandId = NewType("CommandId", str)
SessionId = NewType("SessionId", str)
GatewayId = NewType("GatewayId", str)

HOST_ID_PATTERN = r"^[a-z0-9_-]{1,63}$"
COMMAND_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_HOST_ID_RE = re.compile(HOST_ID_PATTERN)
_COMMAND_ID_RE = re.compile(COMMAND_ID_PATTERN)

# Field types for pydantic models: the NewType for mypy, the pattern for validation.
HostIdField = Annotated[HostId, StringConstraints(pattern=HOST_ID_PATTERN)]
CommandIdField = Annotated[CommandId, StringConstraints(pattern=COMMAND_ID_PATTERN)]
SessionIdField = Annotated[SessionId, StringConstraints(pattern=COMMAND_ID_PATTERN)]
GatewayIdField = Annotated[GatewayId, StringConstraints(pattern=HOST_ID_PATTERN)]


def is_host_id(value: str) -> bool:
    """Return whether `value` is a valid host id (`[a-z0-9_-]{1,63}`)."""
    return _HOST_ID_RE.fullmatch(value) is not None


def is_command_id(value: str) -> bool:
    """Return whether `value` is a valid command id (`[A-Za-z0-9_-]{1,64}`)."""
    return _COMMAND_ID_RE.fullmatch(value) is not None


def new_command_id() -> CommandId:
    """Return a fresh random command id (32 hex characters)."""
    return CommandId(uuid.uuid4().hex)


def new_session_id() -> SessionId:
    """Return a fresh random session id (32 hex characters)."""
    return SessionId(uuid.uuid4().hex)
