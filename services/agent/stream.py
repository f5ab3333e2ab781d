"""The agent's output streaming: which commands stream, and how their chunks reach the gateway.

The agent announces the capability ``output_stream`` in its hello; a gateway that takes chunks answers with
an ``output_on`` frame after its welcome (`dispatch.SessionState.output_stream`), and only then are chunks
sent: a gateway that never said so never receives a frame it does not know. The chunking itself (bounded
size, coalescing, per-command budget, backpressure) is `shared.stream.OutputStreamer`.

The `Streamer` reaches the command's task through the context variable `STREAMER`, set by the client around
`Commands.start` (a task inherits its creator's context): `executor.run_command` asks it for a stream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from shared.ids import CommandId
from shared.protocol import OutputChunk
from shared.stream import OutputStreamer

OUTPUT_STREAM = "output_stream"  # the hello capability of an agent that streams output

SendChunk = Callable[[OutputChunk], Awaitable[bool]]


class Streamer:
    """Opens an `OutputStreamer` per command, sending through `send` (False: no session takes chunks now)."""

    def __init__(self, send: SendChunk) -> None:
        self.send = send

    def open(self, command_id: CommandId) -> OutputStreamer:
        """A started stream for `command_id`."""
        return OutputStreamer(command_id, self.send).start()


STREAMER: ContextVar[Streamer | None] = ContextVar("warlock_output_streamer", default=None)


def open_stream(command_id: CommandId) -> OutputStreamer | None:
    """The stream of `command_id` when the running task has a `Streamer`, else None (nothing streams)."""
    streamer = STREAMER.get()
    return streamer.open(command_id) if streamer is not None else None
