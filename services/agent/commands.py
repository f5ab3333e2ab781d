"""Commands owned by the agent, not by a connection: run through the ledger under a concurrency cap.

A dropped connection does not cancel a command; its result goes to the outbox (on disk: it survives a
restart) and is delivered when (and if) a session is up, and re-sent after each welcome until acked. A
command's timeout counts from when the agent received it: the wait for a free slot uses it up, and one
whose budget ran out is answered ``busy`` without running (`budget`).

Before anything else a command's signature is checked (`services.agent.trust`), then the ledger refuses
an id it has seen (`replay`). A refusal is sent once, straight to the gateway and not through the outbox
(it must not replace the un-acked result of the command that did run under that id).

A signed cancel (`cancel`, kind ``cancel``) of a command running here (or waiting for a slot) sets its
cancel event: the executor kills its process group and its result, signed like any other, says
``cancelled``. A cancel of a finished command changes nothing (``finished``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from shared import signing
from shared.errors import ErrorCode
from shared.protocol import (
    CancelAnswer,
    CancelRequest,
    Exec,
    ExecError,
    ExecResult,
    ResultAnswer,
    ResultQuery,
)

from . import budget
from .allocator import release_after
from .executor import CANCEL, run_command
from .ledger import Ledger, Result
from .results import SIGNATURE_ROOM, Outbox, fit_result
from .trust import AgentTrust

log = logging.getLogger(__name__)

Deliver = Callable[[Result], Awaitable[None]]
ANSWER_ROOM = 512  # bytes a result query's answer adds around the result it carries


class Commands:
    """Tracks every running command task; `finish` bounds how long shutdown waits for them."""

    def __init__(
        self,
        ledger: Ledger,
        outbox: Outbox,
        deliver: Deliver,
        *,
        trust: AgentTrust,
        limit: int,
        max_output: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.outbox = outbox
        self.deliver = deliver
        self.trust = trust
        self.max_output = max_output
        self.limit = limit
        self.clock = clock
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancels: dict[str, asyncio.Event] = {}  # command id → its cancel event, while it may run

    def __len__(self) -> int:
        """How many commands are running (or waiting for a slot)."""
        return len(self._tasks)

    def start(self, request: Exec) -> None:
        """Run `request` in a tracked task; its timeout counts from now. From now on a cancel of its id
        is `accepted` (the event is registered here, before the next frame is read, not in the task)."""
        received = self.clock()
        command_id = request.command_id
        cancel: asyncio.Event | None = None  # None: a replay (or its id runs now): it registers none
        if command_id not in self._cancels and self.ledger.replay(command_id) is None:
            cancel = self._cancels[command_id] = asyncio.Event()
        task = asyncio.create_task(self._run(request, received, cancel), name=f"command-{command_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, request: Exec, received: float, cancel: asyncio.Event | None = None) -> None:
        """`_run_once`, then forget the id's cancel event `cancel` (registered by `start` for this run)."""
        try:
            await self._run_once(request, received)
        finally:
            if cancel is not None and self._cancels.get(request.command_id) is cancel:
                del self._cancels[request.command_id]

    async def _run_once(self, request: Exec, received: float) -> None:
        """Signature, then ledger (a seen id does not run), then keep the result until acked; deliver it."""
        refused = self.trust.check_exec(request)
        if refused is not None:
            await self.deliver(refused)
            return

        def admit(request: Exec) -> contextlib.AbstractAsyncContextManager[Exec | ExecError]:
            return self._slot(request, received)

        assert request.signature is not None  # check_exec refuses an unsigned request
        keep_until = request.signature.not_after
        result = await self.ledger.run(request, self._execute, admit, keep_until=keep_until)
        if isinstance(result, ExecError) and result.code is ErrorCode.REPLAY:
            await self.deliver(result)
            return
        self.outbox.add(result)  # no-op when `_execute` already kept this result
        await self.deliver(result)
        if isinstance(result, ExecResult):
            release_after(len(result.stdout) + len(result.stderr))

    @contextlib.asynccontextmanager
    async def _slot(self, request: Exec, received: float) -> AsyncIterator[Exec | ExecError]:
        """Hold a slot while the context runs, yielding the request with its timeout's rest, or `busy`."""
        try:
            async with asyncio.timeout(budget.slot_wait(request.timeout, self.clock() - received)):
                await self._slots.acquire()
        except TimeoutError:
            waited = self.clock() - received
            log.warning(
                "command %s: no free slot within its %gs timeout; not run",
                request.command_id,
                request.timeout,
            )
            yield budget.no_slot(request.command_id, request.timeout, waited, self.limit)
            return
        try:
            waited = self.clock() - received
            timeout = budget.start_timeout(request.timeout, waited)
            if timeout is None:
                yield budget.no_slot(request.command_id, request.timeout, waited, self.limit)
            else:
                yield request.model_copy(update={"timeout": timeout})
        finally:
            self._slots.release()

    async def _execute(self, request: Exec) -> Result:
        """Run the admitted command (it holds a slot) with what is left of its timeout; sign its result."""
        token = CANCEL.set(self._cancels.get(request.command_id))
        try:
            result = self.trust.seal(
                await run_command(request.command_id, request.command, request.timeout, self.max_output)
            )
        finally:
            CANCEL.reset(token)
        self.outbox.add(result)  # kept (on disk) before the ledger records it done: see `Ledger.learn`
        return result

    def answer(self, query: ResultQuery, max_bytes: int) -> ResultAnswer:
        """The signed answer to a result query (API-signed, kind ``result_query``): what the ledger says of
        the command id (`Ledger.query`), with its recorded result trimmed to `max_bytes` and signed. A query
        that does not verify is answered ``refused`` (unsigned); nothing is run either way."""
        fields = signing.signed_fields(query)
        refused = self.trust.verify("result_query", query.query_id, fields, query.signature)
        if refused is not None:
            description = f"{refused.code}: {refused.description}"[:1024]
            return ResultAnswer(
                query_id=query.query_id, command_id=query.command_id, state="refused", description=description
            )
        state, recorded = self.ledger.query(query.command_id, query.exec_not_after)
        result: ExecResult | None = None
        error: ExecError | None = None
        if recorded is not None:
            room = max_bytes - SIGNATURE_ROOM - ANSWER_ROOM
            kept = self.trust.seal(fit_result(recorded, room))
            if isinstance(kept, ExecResult):
                result = kept
            else:
                error = kept
        answer = ResultAnswer(
            query_id=query.query_id, command_id=query.command_id, state=state, result=result, error=error
        )
        log.info("result query %s about command %s: %s", query.query_id, query.command_id, state)
        return signing.sign_answer(self.trust.key, self.trust.host_id, answer)

    def cancel(self, request: CancelRequest) -> CancelAnswer:
        """Cancel a command if the API signed the cancel (kind ``cancel``, ``{command_id, exec_not_after}``,
        this host): ``accepted`` (running or waiting for a slot: killed now, its result says cancelled),
        ``finished`` (its result stands), ``never_ran`` (it never arrived; its id is refused from now on,
        until `exec_not_after`), ``not_running`` (unknown here), or ``refused`` with the typed code."""
        command_id = request.command_id
        fields = signing.signed_fields(request)
        refused = self.trust.verify("cancel", command_id, fields, request.signature)
        if refused is not None:
            return CancelAnswer(
                command_id=command_id,
                state="refused",
                code=refused.code,
                description=refused.description[:1024],
            )
        if self.ledger.lookup(command_id) is not None:  # recorded (synchronously) as soon as it ended
            log.info("command %s: cancel of a finished command; its result stands", command_id)
            return CancelAnswer(command_id=command_id, state="finished", description="it already finished")
        event = self._cancels.get(command_id)
        if event is not None:
            event.set()
            log.info("command %s: cancel accepted", command_id)
            return CancelAnswer(command_id=command_id, state="accepted")
        if request.exec_not_after is not None:
            state, _ = self.ledger.query(command_id, request.exec_not_after)  # `never_ran` records it used
            if state == "never_ran":
                log.info("command %s: cancelled before it arrived; its id is now refused", command_id)
                why = "it never reached this agent, and its id is now refused here"
                return CancelAnswer(command_id=command_id, state="never_ran", description=why)
        log.info("command %s: cancel of a command not running here", command_id)
        return CancelAnswer(
            command_id=command_id, state="not_running", description="not running on this host"
        )

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
