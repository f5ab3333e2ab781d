"""Commands owned by the agent, not by a connection: run through the ledger under a concurrency cap.

A dropped connection does not cancel a command; its result goes to the outbox and is delivered when (and
if) a session is up, and re-sent after each welcome until acked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from shared.protocol import Exec

from .executor import run_command
from .ledger import Ledger, Result
from .results import Outbox

log = logging.getLogger(__name__)

Deliver = Callable[[Result], Awaitable[None]]


class Commands:
    """Tracks every running command task; `finish` bounds how long shutdown waits for them."""

    def __init__(
        self, ledger: Ledger, outbox: Outbox, deliver: Deliver, *, limit: int, max_output: int
    ) -> None:
        self.ledger = ledger
        self.outbox = outbox
        self.deliver = deliver
        self.max_output = max_output
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        """How many commands are running (or waiting for a slot)."""
        return len(self._tasks)

    def start(self, request: Exec) -> None:
        """Run `request` in a tracked task."""
        task = asyncio.create_task(self._run(request), name=f"command-{request.command_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, request: Exec) -> None:
        """Ledger first (a repeated id does not run), then keep the result until acked and deliver it."""
        result = await self.ledger.run(request, self._execute)
        self.outbox.add(result)
        await self.deliver(result)

    async def _execute(self, request: Exec) -> Result:
        """Run the command under the concurrency cap."""
        async with self._slots:
            return await run_command(request.command_id, request.command, request.timeout, self.max_output)

    async def wait(self, grace: float) -> None:
        """Wait up to `grace` seconds for the running commands to finish."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)

    async def finish(self, grace: float) -> None:
        """Give running commands `grace` seconds, then cancel (and kill) what is left."""
        await self.wait(grace)
        if self._tasks:
            log.warning("cancelling %d command(s) still running at shutdown", len(self._tasks))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
