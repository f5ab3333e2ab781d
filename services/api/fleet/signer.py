"""The API's command signer: every request that changes a host leaves the API signed (`shared.signing`).

The private key is a file (``WARLOCK_API_SIGNING_KEY_FILE``, 0600) made at first start; it is never sent
anywhere. Agents and the SSH worker trust its public key, plus any listed in
``WARLOCK_API_EXTRA_TRUSTED_KEYS`` (the next or previous signing key, while the key is being rotated):
`trusted_keys` is what installs and reconfigures write into each agent's config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TypeVar

from shared import signing
from shared.protocol import Message

log = logging.getLogger("services.api")
M = TypeVar("M", bound=Message)


class ApiSigner:
    """Signs commands with the API's key; knows the public keys hosts should trust."""

    def __init__(self, key_file: Path, extra_trusted: list[str], ttl: float) -> None:
        field = "signing_key_file (WARLOCK_API_SIGNING_KEY_FILE)"
        self.key, created = signing.ensure_private(key_file, field)
        self.public_key = signing.public_text(self.key)
        self.key_id = signing.key_id(self.key)
        self.ttl = ttl
        keys = [self.public_key, *(k for k in extra_trusted if k != self.public_key)]
        self.trusted_keys: tuple[str, ...] = tuple(keys)
        if created:
            log.info("signing key %s created in %s", self.key_id, key_file)
        else:
            log.info("signing key %s loaded from %s", self.key_id, key_file)

    def sign(self, kind: str, message: M, host_id: str) -> M:
        """`message` with the API's signature for `host_id` (over `signing.signed_fields(message)`)."""
        signature = signing.sign_command(self.key, kind, signing.signed_fields(message), host_id, self.ttl)
        return message.model_copy(update={"signature": signature})
