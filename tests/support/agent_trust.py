"""Agent-side trust for tests: an `AgentTrust` trusting a `TestSigner`, and signed Exec frames."""

from __future__ import annotations

from pathlib import Path

from services.agent.ledger import RETENTION_S
from services.agent.trust import AgentTrust
from shared import signing
from shared.ids import CommandId, HostId
from shared.protocol import Exec
from tests.support.trust import TestSigner

HOST = HostId("web-1")


def agent_trust(root: Path, host_id: str = HOST, signer: TestSigner | None = None) -> AgentTrust:
    """An AgentTrust for `host_id` with a fresh identity key, trusting `signer` (default: one in `root`)."""
    signer = signer or TestSigner(root)
    return AgentTrust(HostId(host_id), signing.generate(), [signer.public_key], max_ttl=RETENTION_S)


def signed_exec(
    signer: TestSigner, command_id: str, command: str, timeout: float = 5.0, host_id: str = HOST
) -> Exec:
    """An Exec frame signed by `signer` for `host_id`."""
    frame = Exec(command_id=CommandId(command_id), command=command, timeout=timeout)
    signed = signer.sign("exec", frame, host_id)
    assert isinstance(signed, Exec)
    return signed
