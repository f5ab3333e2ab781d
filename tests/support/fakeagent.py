"""Playing an agent against the API in tests: an agent key the API knows, signed results, and the check a
real agent makes on the API's signature before it would run anything."""

from __future__ import annotations

import time
from typing import Any

from services.api.store import crud
from shared import signing
from shared.protocol import ExecRequest, ExecResult, Hello, PresenceConnected, SshExecRequest, decode_model
from tests.support.db import RunningApi
from tests.support.trust import TestSigner


class AgentKey:
    """An agent's own Ed25519 key (in memory): signs results and hellos as a real agent does."""

    def __init__(self) -> None:
        self.key = signing.generate()
        self.public_key = signing.public_text(self.key)

    def result(self, host_id: str, **fields: Any) -> ExecResult:
        """A result with `fields` (command_id, exit_code, duration_ms ...), signed for `host_id`."""
        values: dict[str, Any] = {"exit_code": 0, "duration_ms": 3.5}
        values.update(fields)
        return signing.sign_result(self.key, host_id, ExecResult.model_validate(values))

    def connected(self, host_id: str, session_id: str, at: float, **fields: Any) -> PresenceConnected:
        """The presence event a gateway publishes for a hello this agent signed now."""
        signed_at = fields.pop("signed_at", time.time())
        hello = Hello(
            host_id=host_id,
            hostname=fields.pop("hostname", "box"),
            platform=fields.pop("platform", "linux"),
            agent_version=fields.pop("agent_version", "1.0"),
            signed_at=signed_at,
        )
        sig = signing.sign_values(self.key, signing.HELLO_DOMAIN, signing.hello_values(hello))
        values: dict[str, Any] = {
            "host_id": host_id,
            "session_id": session_id,
            "gateway_id": "gw-1",
            "hostname": hello.hostname,
            "platform": hello.platform,
            "agent_version": hello.agent_version,
            "at": at,
            "signed_at": signed_at,
            "signature": sig,
        }
        values.update(fields)
        return PresenceConnected.model_validate(values)


async def register_agent_key(api: RunningApi, host_id: str, public_key: str) -> None:
    """Store `public_key` as `host_id`'s agent key in the API's database (what an install does)."""
    async with api.state.sessions() as session:
        await crud.set_agent_public_key(session, host_id, public_key)


def api_signer(api: RunningApi) -> TestSigner:
    """The test's view of the API signing key (the same file the API under test loaded)."""
    return TestSigner(api.settings.signing_key_file.parent, api.settings.signing_key_file.name)


def checked_request(api: RunningApi, host_id: str, data: bytes) -> ExecRequest:
    """Decode an exec request (agent or SSH) and verify the API's signature as an agent / worker would;
    raise `signing.CommandRefused` if it does not verify."""
    ssh = b'"target"' in data
    request: ExecRequest = decode_model(SshExecRequest if ssh else ExecRequest, data)
    trusted = signing.TrustedKeys([api_signer(api).public_key])
    kind = "ssh_exec" if ssh else "exec"
    signing.verify_command(kind, signing.signed_fields(request), request.signature, trusted, host_id, 600)
    return request
