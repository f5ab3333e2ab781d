"""Results kept by the agent: fitting them into one frame, bounding the output kept, holding them until acked.

A result that is changed here loses the agent's signature (`services.agent.trust.AgentTrust.seal` signs
it again before it is sent), so a signature always covers the output it travels with.

Output kept beyond the first answer is bounded twice: per result (`cap_output`, each stream cut to a
number of UTF-8 bytes) and in total (`OutputBudget`: past its bytes, the oldest results lose their output
and keep their outcome, flagged ``truncated``). The ledger and the outbox each keep one budget.

The outbox is kept on disk too (`services.agent.outbox`), so un-acked results survive a restart.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from shared.protocol import ExecError, ExecResult, encode

if TYPE_CHECKING:
    from .outbox import OutboxStore

log = logging.getLogger(__name__)

Result = ExecResult | ExecError
MAX_UNACKED = 10_000
OUTBOX_MAX_BYTES = 16 * 1024 * 1024
SIGNATURE_ROOM = 128  # bytes a result's signature adds to its frame


def output_bytes(result: Result) -> int:
    """UTF-8 bytes of a result's stdout and stderr (0 for an error)."""
    if isinstance(result, ExecError):
        return 0
    return _utf8_len(result.stdout) + _utf8_len(result.stderr)


def _utf8_len(text: str) -> int:
    """UTF-8 length of `text`, without encoding it when it is ASCII."""
    return len(text) if text.isascii() else len(text.encode())


def _cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, on a character boundary."""
    if len(text) <= limit // 4 or _utf8_len(text) <= limit:
        return text
    return text.encode()[:limit].decode("utf-8", errors="ignore")


def cap_output(result: Result, per_stream: int) -> Result:
    """`result` with stdout and stderr each cut to `per_stream` UTF-8 bytes (sets `truncated` if cut)."""
    if isinstance(result, ExecError):
        return result
    stdout, stderr = _cut(result.stdout, per_stream), _cut(result.stderr, per_stream)
    if stdout is result.stdout and stderr is result.stderr:
        return result
    return result.model_copy(
        update={"stdout": stdout, "stderr": stderr, "truncated": True, "signature": None}
    )


def strip_output(result: Result) -> Result:
    """`result` without its output: the outcome (exit status, signal, timing) stays, `truncated` is set."""
    if isinstance(result, ExecError) or not (result.stdout or result.stderr):
        return result
    return result.model_copy(update={"stdout": "", "stderr": "", "truncated": True, "signature": None})


class OutputBudget:
    """Output bytes of the newest results within `max_bytes`: says whose output to drop, oldest first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.total = 0
        self._sizes: OrderedDict[str, int] = OrderedDict()

    def add(self, key: str, size: int) -> list[str]:
        """Count `size` bytes for `key` (the newest); return the keys whose output must go to fit."""
        self.discard(key)
        if size > 0:
            self._sizes[key] = size
            self.total += size
        over: list[str] = []
        while self.total > self.max_bytes and self._sizes:
            oldest, dropped = self._sizes.popitem(last=False)
            self.total -= dropped
            over.append(oldest)
        return over

    def discard(self, key: str) -> None:
        """Stop counting `key` (its result is gone or lost its output)."""
        self.total -= self._sizes.pop(key, 0)

    def __len__(self) -> int:
        """How many results still hold output."""
        return len(self._sizes)


def fit_result(result: Result, max_bytes: int) -> Result:
    """Return `result` trimmed so its encoded frame is at most `max_bytes` (sets `truncated`).

    A trimmed result has no signature (its frame is measured without one: keep `SIGNATURE_ROOM` free).

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
        result = result.model_copy(update={field: text[:keep], "truncated": True, "signature": None})
    return result


class Outbox:
    """Results sent (or not yet sent) and not yet acknowledged by the gateway, oldest first.

    At most `limit` results and `max_bytes` of their output: past that, the oldest lose their output
    (their outcome is still re-sent), then the oldest are dropped (the ledger still answers their id).

    With a `store` (`services.agent.outbox.OutboxStore`) every change is also made on disk, so what is
    not acked survives a restart: `open` loads it back (within the same bounds).
    """

    def __init__(
        self, limit: int = MAX_UNACKED, max_bytes: int = OUTBOX_MAX_BYTES, store: OutboxStore | None = None
    ) -> None:
        self.limit = limit
        self.store = store
        self._pending: OrderedDict[str, Result] = OrderedDict()
        self._seq: dict[str, int] = {}
        self._next = 0
        self._budget = OutputBudget(max_bytes)

    def open(self) -> int:
        """Load what the store kept from before (oldest first, bounded as when added); return how many.

        Raises OSError when the store's directory cannot be created or read.
        """
        if self.store is None:
            return 0
        entries = self.store.load()
        for seq, result in entries:
            self._next = max(self._next, seq)
            self._keep(result, seq, write=False)
        self._next += 1
        return len(entries)

    def add(self, result: Result) -> None:
        """Keep `result` (on disk too, with a store) until `ack` names its command id."""
        if self._pending.get(result.command_id) is result:
            return  # already kept (the command's runner keeps it before the ledger records it)
        self._next += 1
        self._keep(result, self._next, write=True)

    def _keep(self, result: Result, seq: int, write: bool) -> None:
        """Keep `result` as the newest, then apply the bounds (rewriting or removing what they change)."""
        command_id = result.command_id
        self._pending[command_id] = result
        self._pending.move_to_end(command_id)
        self._seq[command_id] = seq
        over = self._budget.add(command_id, output_bytes(result))
        if write and command_id not in over:
            self._write(command_id)
        for key in over:
            log.warning(
                "un-acked results over %d bytes: dropping the output of %s", self._budget.max_bytes, key
            )
            self._pending[key] = strip_output(self._pending[key])
            self._write(key)
        while len(self._pending) > self.limit:
            dropped, _ = self._pending.popitem(last=False)
            self._budget.discard(dropped)
            self._seq.pop(dropped, None)
            if self.store is not None:
                self.store.remove(dropped)
            log.warning("too many un-acked results; dropping the oldest (%s); the ledger keeps it", dropped)

    def _write(self, command_id: str) -> None:
        """Write the kept result of `command_id` to the store, if there is one."""
        if self.store is not None:
            self.store.put(self._seq[command_id], self._pending[command_id])

    def ack(self, command_id: str) -> bool:
        """Forget the result of `command_id` (and its file); return whether it was pending."""
        self._budget.discard(command_id)
        self._seq.pop(command_id, None)
        found = self._pending.pop(command_id, None) is not None
        if found and self.store is not None:
            self.store.remove(command_id)
        return found

    def output_bytes(self) -> int:
        """Output bytes the un-acked results hold."""
        return self._budget.total

    def pending(self) -> list[Result]:
        """Every un-acked result, oldest first."""
        return list(self._pending.values())

    def __contains__(self, command_id: object) -> bool:
        """Whether a result for `command_id` waits for an ack."""
        return command_id in self._pending

    def __len__(self) -> int:
        """How many results wait for an ack."""
        return len(self._pending)
