"""Keys for tests: the API's signing key as a test plays the API, and signed requests made with it."""

from __future__ import annotations

import json
from pathlib import Path

from shared import signing
from shared.ids import new_command_id
from shared.protocol import ExecRequest, Message, decode_model


class TestSigner:
    """An API signing key in `root` (the same file a `warlock-api` started by the test would load)."""

    __test__ = False  # not a test class

    def __init__(self, root: Path, name: str = "signing.key") -> None:
        self.key_file = root / name
        self.key, _ = signing.ensure_private(self.key_file)
        self.public_key = signing.public_text(self.key)
        self.key_id = signing.key_id(self.key)

    def sign(self, kind: str, message: Message, host_id: str, ttl: float = 120.0) -> Message:
        """`message` signed for `host_id`."""
        sig = signing.sign_command(self.key, kind, signing.signed_fields(message), host_id, ttl)
        return message.model_copy(update={"signature": sig})

    def exec_body(self, host_id: str, body: bytes | str | ExecRequest, ttl: float = 120.0) -> bytes:
        """An exec request for `host_id` (JSON or model), given a command id if it has none, signed."""
        request = body if isinstance(body, ExecRequest) else decode_model(ExecRequest, body)
        if request.command_id is None:
            request = request.model_copy(update={"command_id": new_command_id()})
        return json.dumps(self.sign("exec", request, host_id, ttl).model_dump(mode="json")).encode()
