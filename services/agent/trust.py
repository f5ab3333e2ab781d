"""The agent's side of the trust model: its own key, the API keys it trusts, checking and signing.

- Identity: an Ed25519 key made on the host at first start (``identity_key_file``, 0600); its private
  half never leaves the host. The agent signs its hello and every result with it, and the hash of every
  token it makes itself on rotation (`shared.signing`).
- Commands: an Exec or RotateToken frame runs only if it carries a signature by one of ``trusted_keys``
  over exactly the fields that arrived, for this host, within its validity window, and its id is new to
  the ledger. A refused frame is answered with a typed error and nothing runs (`Refusal`).

Verification costs ~60 µs per command and PyNaCl ~1 MiB of RSS.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from shared import signing
from shared.errors import ConfigError
from shared.ids import CommandId, HostId
from shared.protocol import CommandSignature, Exec, ExecError, ExecResult, Hello, RotateToken

log = logging.getLogger(__name__)

IDENTITY_FIELD = "identity_key_file (WARLOCK_AGENT_IDENTITY_KEY_FILE)"

Result = ExecResult | ExecError


def load_identity(path: Path) -> SigningKey:
    """The agent's own key from `path`, made there first (0600) if missing; ConfigError if unusable."""
    try:
        key, created = signing.ensure_private(path, IDENTITY_FIELD)
    except OSError as exc:
        raise ConfigError(IDENTITY_FIELD, f"cannot create {path}: {exc.strerror or exc}") from exc
    public = signing.public_text(key)
    if created:
        log.warning(
            "identity key created in %s; public key %s: the API must know it (an install records it; "
            "otherwise register it) or it will not accept this agent's results",
            path,
            public,
        )
    else:
        log.info("identity key %s loaded from %s", signing.key_id(key), path)
    return key


class AgentTrust:
    """What one agent checks and signs: its host id, its key, the keys it trusts and the ledger's horizon."""

    def __init__(
        self,
        host_id: HostId,
        key: SigningKey,
        trusted_keys: list[str] | tuple[str, ...],
        max_ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host_id = host_id
        self.key = key
        self.public_key = signing.public_text(key)
        self.trusted = signing.TrustedKeys(trusted_keys)
        self.max_ttl = max_ttl  # the ledger's retention: no accepted envelope outlives its id's record
        self.clock = clock

    # ------------------------------------------------------------------ commands in

    def verify(
        self, kind: str, command_id: str, fields: Mapping[str, Any], signature: CommandSignature | None
    ) -> ExecError | None:
        """None if the command may run; else the typed refusal (logged here, once, without secrets)."""
        try:
            signer = signing.verify_command(
                kind, fields, signature, self.trusted, self.host_id, self.max_ttl, now=self.clock()
            )
        except signing.CommandRefused as exc:
            log.warning("%s %s refused (%s): %s; nothing ran", kind, command_id, exc.code, exc.description)
            return ExecError(
                command_id=CommandId(command_id), code=exc.code, description=exc.description[:4096]
            )
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s signed by key %s", kind, command_id, signer)
        return None

    def check_exec(self, frame: Exec) -> ExecError | None:
        """Verify an Exec frame's signature (kind ``exec``: command_id, command, timeout)."""
        return self.verify("exec", frame.command_id, signing.signed_fields(frame), frame.signature)

    def check_rotate(self, frame: RotateToken) -> ExecError | None:
        """Verify a RotateToken frame's signature (kind ``rotate``: {"command_id": rotation_id})."""
        return self.verify("rotate", frame.rotation_id, {"command_id": frame.rotation_id}, frame.signature)

    # ------------------------------------------------------------------ what the agent signs

    def seal(self, result: Result) -> Result:
        """`result` as sent: an ExecResult carries the agent's signature (kept if it has one).

        Everything that changes a kept result (`results.cap_output`, `strip_output`, `fit_result`) drops
        its signature, so a result with one is the result that was signed.
        """
        if isinstance(result, ExecError) or result.signature is not None:
            return result
        return signing.sign_result(self.key, self.host_id, result)

    def sign_hello(self, hello: Hello) -> Hello:
        """`hello` stamped with the agent's clock and signed (`signing.hello_values`)."""
        stamped = hello.model_copy(update={"signed_at": self.clock()})
        sig = signing.sign_values(self.key, signing.HELLO_DOMAIN, signing.hello_values(stamped))
        return stamped.model_copy(update={"signature": sig})

    def sign_rotated(self, rotation_id: str, token_sha256: str) -> str:
        """The agent's signature over the hash of the token it made for `rotation_id`."""
        values = signing.rotated_values(self.host_id, rotation_id, token_sha256)
        return signing.sign_values(self.key, signing.ROTATED_DOMAIN, values)
