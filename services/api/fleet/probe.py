"""Adding a host: ask the SSH worker to reach it and report its host key (trust on first use).

The probe is signed (kind ``probe``) for the host id being added: the worker dials only addresses the API
asked for.
"""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client as NATS

from services.api.errors import SshCheckFailed, WorkerUnavailable
from services.api.fleet.signer import ApiSigner
from shared import subjects
from shared.errors import ProtocolError
from shared.protocol import SshProbeOk, SshProbeRequest, decode_probe_reply, encode


async def probe_host(
    nc: NATS, signer: ApiSigner, host_id: str, address: str, port: int, username: str, wait_s: float
) -> SshProbeOk:
    """The host key the worker saw; SshCheckFailed (422) if the host refused, WorkerUnavailable (503)."""
    request = SshProbeRequest(host_id=host_id, address=address, port=port, username=username)
    request = signer.sign("probe", request, host_id)
    try:
        msg = await nc.request(subjects.SSH_PROBE, encode(request), timeout=wait_s)
    except nats.errors.NoRespondersError as exc:
        raise WorkerUnavailable("no SSH worker is running: cannot check the host") from exc
    except nats.errors.TimeoutError as exc:
        raise WorkerUnavailable(f"the SSH worker did not answer within {wait_s:g}s") from exc
    except nats.errors.Error as exc:
        raise WorkerUnavailable(f"NATS unavailable: {type(exc).__name__}") from exc
    try:
        reply = decode_probe_reply(msg.data)
    except ProtocolError as exc:
        raise WorkerUnavailable(f"the SSH worker sent a bad reply: {exc.message}") from exc
    if isinstance(reply, SshProbeOk):
        return reply
    raise SshCheckFailed(f"ssh check failed ({reply.code}): {reply.description}", code=str(reply.code))
