"""Output as it happens: a command's stdout and stderr coalesced into bounded chunks, shared by the agent and
the SSH worker so both stream the same way.

`OutputStreamer.feed` never blocks (the command's pipes are read at full speed whatever the transport does);
one flusher task sends what was fed, at most one batch per `interval` unless a chunk is full, each chunk at
most `max_chunk` bytes. While a send is slow, output keeps coalescing in the buffer. Past the per-command
`budget` (bytes fed), streaming stops: the last chunk says ``truncated`` and nothing more is sent for the
command. The buffer therefore never holds more than `budget` bytes. Chunks are not authoritative: the final
result is, and carries the output up to its own cap whatever happened to the stream.

`send` returns whether the chunk left; a chunk that could not be sent (no session) does not use up a `seq`
number, so the numbers a reader sees have no gap unless a chunk was lost on the way.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from shared.ids import CommandId
from shared.protocol import MAX_CHUNK_BYTES, OutputChunk, OutputStreamName

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.05  # at most one batch of chunks per interval (unless a chunk is full)
COMMAND_BUDGET_BYTES = 1024 * 1024  # bytes of output one command may stream; past it: truncated
CLOSE_WAIT_S = 2.0  # how long the end of a command waits for its last chunks to leave

Send = Callable[[OutputChunk], Awaitable[bool]]


class OutputStreamer:
    """One command's output stream: `feed` from the pipe readers, `close` once the command ended."""

    def __init__(
        self,
        command_id: CommandId,
        send: Send,
        *,
        max_chunk: int = MAX_CHUNK_BYTES,
        interval: float = FLUSH_INTERVAL_S,
        budget: int = COMMAND_BUDGET_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.command_id = command_id
        self.send = send
        # a chunk's text may carry up to 3 bytes held back from the previous one (a character split
        # across reads): its length in characters stays within MAX_CHUNK_BYTES
        self.max_chunk = min(max_chunk, MAX_CHUNK_BYTES - 4)
        self.interval = interval
        self.budget = budget
        self.clock = clock
        self.seq = 0  # chunks sent so far
        self.sent_bytes = 0  # data bytes (encoded) in the chunks sent
        self.fed = 0  # bytes accepted into the stream (≤ budget)
        self.truncated = False  # the budget was reached: the rest is not streamed
        self.done = False  # the truncated marker went out (or the stream was closed)
        self._pending: list[tuple[OutputStreamName, bytearray]] = []
        self._pending_bytes = 0
        self._decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in ("stdout", "stderr")
        }
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> OutputStreamer:
        """Start the flusher task (in the running loop); returns self."""
        self._task = asyncio.create_task(self._run(), name=f"output-{self.command_id}")
        return self

    def feed(self, stream: OutputStreamName, data: bytes) -> None:
        """Take `data` read from the command's `stream`; never blocks, never raises."""
        if self.truncated or self._closing or not data:
            return
        room = self.budget - self.fed
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        self.fed += len(data)
        if data:
            if self._pending and self._pending[-1][0] == stream:
                self._pending[-1][1].extend(data)
            else:
                self._pending.append((stream, bytearray(data)))
            self._pending_bytes += len(data)
        self._wake.set()

    async def close(self, wait: float = CLOSE_WAIT_S) -> None:
        """The command ended: send what is left (up to `wait` seconds), then stop the flusher."""
        self._closing = True
        self._wake.set()
        task = self._task
        if task is None:
            return
        try:
            async with asyncio.timeout(wait):
                await asyncio.shield(task)
        except TimeoutError:
            log.info("command %s: last output chunks not sent within %gs; dropped", self.command_id, wait)
            await self.abort()

    async def abort(self) -> None:
        """Stop at once (the command was cancelled); unsent output is dropped."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        last = float("-inf")
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._closing and self._pending_bytes < self.max_chunk:
                delay = last + self.interval - self.clock()
                if delay > 0:
                    await asyncio.sleep(delay)  # coalesce: more output joins this batch meanwhile
            last = self.clock()
            await self._flush()
            if self.done or (self._closing and not self._pending):
                return

    def _take(self) -> tuple[OutputStreamName, bytes]:
        """The next chunk's stream and bytes (at most `max_chunk`), removed from the buffer."""
        stream, buf = self._pending[0]
        data = bytes(buf[: self.max_chunk])
        del buf[: self.max_chunk]
        if not buf:
            self._pending.pop(0)
        self._pending_bytes -= len(data)
        return stream, data

    async def _flush(self) -> None:
        """Send every buffered byte as chunks; the last one is marked truncated when the budget was hit."""
        while self._pending:
            stream, data = self._take()
            final = self._closing and not any(s == stream for s, _ in self._pending)
            text = self._decoders[stream].decode(data, final=final or self.truncated)
            marker = self.truncated and not self._pending
            await self._send(stream, text, len(data), marker)
        if self._closing and not self.truncated:
            for name, decoder in self._decoders.items():
                if tail := decoder.decode(b"", final=True):  # a character cut off by the command's end
                    await self._send(name, tail, 0, False)  # type: ignore[arg-type]
        if self.truncated and not self.done:
            await self._send("stdout", "", 0, True)  # the budget ran out on a flush boundary

    async def _send(self, stream: OutputStreamName, text: str, size: int, marker: bool) -> None:
        if self.done:
            return
        chunk = OutputChunk(
            command_id=self.command_id, seq=self.seq + 1, stream=stream, data=text, truncated=marker
        )
        try:
            sent = await self.send(chunk)
        except Exception:  # a transport failure never reaches the command
            log.exception("command %s: sending an output chunk failed", self.command_id)
            sent = False
        if sent:
            self.seq += 1
            self.sent_bytes += size
        if marker:
            self.done = True
