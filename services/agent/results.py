"""Results on their way to the gateway: fitting them into one frame, and keeping them until acked."""

from __future__ import annotations

import logging
from collections import OrderedDict

from shared.protocol import ExecError, ExecResult, encode

log = logging.getLogger(__name__)

Result = ExecResult | ExecError
MAX_UNACKED = 10_000


def fit_result(result: Result, max_bytes: int) -> Result:
    """Return `result` trimmed so its encoded frame is at most `max_bytes` (sets `truncated`).

    The longer of stdout/stderr is cut from its end, repeatedly, until the frame fits; an ExecError's
    description is cut the same way. Every character encodes to at least one byte, so cutting `excess`
    characters shrinks the frame by at least `excess` bytes.
    """
    while (excess := len(encode(result)) - max_bytes) > 0:
        if isinstance(result, ExecError):
            if not result.description:
                break
            keep = max(0, len(result.description) - excess)
            result = result.model_copy(update={"description": result.description[:keep]})
            continue
        field = "stdout" if len(result.stdout) >= len(result.stderr) else "stderr"
        text: str = getattr(result, field)
        if not text:
            break
        keep = max(0, len(text) - excess)
        result = result.model_copy(update={field: text[:keep], "truncated": True})
    return result


class Outbox:
    """Results sent (or not yet sent) and not yet acknowledged by the gateway, oldest first."""

    def __init__(self, limit: int = MAX_UNACKED) -> None:
        self.limit = limit
        self._pending: OrderedDict[str, Result] = OrderedDict()

    def add(self, result: Result) -> None:
        """Keep `result` until `ack` names its command id."""
        self._pending[result.command_id] = result
        self._pending.move_to_end(result.command_id)
        while len(self._pending) > self.limit:
            dropped, _ = self._pending.popitem(last=False)
            log.warning("too many un-acked results; dropping the oldest (%s); the ledger keeps it", dropped)

    def ack(self, command_id: str) -> bool:
        """Forget the result of `command_id`; return whether it was pending."""
        return self._pending.pop(command_id, None) is not None

    def pending(self) -> list[Result]:
        """Every un-acked result, oldest first."""
        return list(self._pending.values())

    def __len__(self) -> int:
        """How many results wait for an ack."""
        return len(self._pending)
