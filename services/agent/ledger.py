"""On-disk ledger of the command ids run in the last 10 minutes, so no command runs twice.

File format: JSON lines (UTF-8), one record per event::

    {"id": "<command id>", "at": <unix time>, "state": "started"}
    {"id": "<command id>", "at": <unix time>, "state": "done", "result": {...ExecResult or ExecError...}}
    {"id": "rotate:<rotation id>", "at": <unix time>, "state": "used"}      (an id that ran no command)

A "started" record is appended (and flushed) before the command runs, a "done" record after. Records are
flushed to the kernel but not fsynced per command: the ledger survives an agent crash, not a power loss.
At open, every `COMPACT_EVERY_S`, and whenever more than `max_bytes` were appended since the last time,
the file is rewritten from memory without expired ids (temp file + os.replace).

A repeated id is a replay: it is refused with the typed error ``replay`` and never runs again, whether it
is done or running now (or waiting for the right to run: see `Ledger.run`'s `admit`); an id that started
before the agent restarted and never finished is refused with ``unknown_result`` (it may have run), unless
its result reached the outbox before the crash (`Ledger.learn`: then it is ``replay`` and re-sent). (A
result is not answered again: the outbox re-sends it until the gateway acks it, and a replayed envelope
must not fetch a command's output.) An id is kept `retention` seconds, and at
least until the not-after of the signed envelope that brought it (`keep_until`), so a signed command
cannot be replayed after its id is forgotten.

A result query (`Ledger.query`, the API's reconciler asking about a run its stopped sender left pending)
reads the same entries and never runs anything; an id it finds missing while its exec could still arrive is
recorded as used (``state: "used"``, as a rotation id but under the bare command id), so the answer
"never ran here" stays true.

Bounds: every id of the retention is kept, however many (that is the guarantee); the output recorded for
a repeat is not. Each stream of a recorded result is cut to `output_bytes` (64 KiB, what the API keeps),
and all recorded output together to `max_bytes` (4 MiB): past it, the oldest results keep their exit
status and timing with empty output and ``truncated: true``. Memory holds at most `max_bytes` of output
plus a small entry per id; the file at most about twice that, plus a record per id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from shared.errors import ErrorCode
from shared.ids import CommandId
from shared.protocol import Exec, ExecError, ExecResult
from shared.signing import CLOCK_SKEW_S

from .results import OutputBudget, cap_output, output_bytes, strip_output

log = logging.getLogger(__name__)

Result = ExecResult | ExecError
QueryState = Literal["done", "running", "never_ran", "unknown"]
Runner = Callable[[Exec], Awaitable[Result]]
# Waits for the right to run: yields the request to run (its timeout perhaps shortened) or the error
# after which nothing ran; the right is held until the context exits.
Admit = Callable[[Exec], AbstractAsyncContextManager[Exec | ExecError]]

RETENTION_S = 600.0
COMPACT_EVERY_S = 60.0
OUTPUT_BYTES = 64 * 1024
MAX_BYTES = 4 * 1024 * 1024
_results: TypeAdapter[Result] = TypeAdapter(Annotated[Result, Field(discriminator="type")])


@dataclass(slots=True)
class Entry:
    """What the ledger knows about one command id."""

    at: float
    result: Result | None = None
    used: bool = False  # an id that names no command (a token rotation's): `claim`


class Ledger:
    """Run-at-most-once record of command ids, kept in a JSON-lines file."""

    def __init__(
        self,
        path: Path,
        *,
        retention: float = RETENTION_S,
        output_bytes: int = OUTPUT_BYTES,
        max_bytes: int = MAX_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.retention = retention
        self.output_bytes = output_bytes
        self.clock = clock
        self._entries: dict[str, Entry] = {}
        self._running: dict[str, asyncio.Future[Result]] = {}
        self._budget = OutputBudget(max_bytes)
        self._file: IO[bytes] | None = None
        self._compacted_at = 0.0
        self._appended = 0  # bytes appended since the last compaction

    # ------------------------------------------------------------------ file handling

    def open(self) -> None:
        """Create the directory (0700) and file (0600) if needed, load the records and compact."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._load()
        self.compact()

    def close(self) -> None:
        """Compact and close the file."""
        if self._file is not None:
            self.compact()
            self._file.close()
            self._file = None

    def _load(self) -> None:
        """Read every record in the file, skipping corrupt lines with a warning."""
        self._entries.clear()
        self._budget = OutputBudget(self._budget.max_bytes)
        try:
            with self.path.open(encoding="utf-8", errors="replace") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        self._load_line(line, lineno)
        except FileNotFoundError:
            return

    def _load_line(self, line: str, lineno: int) -> None:
        """Apply one record to the in-memory entries."""
        try:
            record = json.loads(line)
            command_id, at, state = str(record["id"]), float(record["at"]), record["state"]
            if state == "started":
                self._entries.setdefault(command_id, Entry(at=at))
            elif state == "used":
                self._entries[command_id] = Entry(at=at, used=True)
            elif state == "done":
                self._remember(command_id, at, _results.validate_python(record["result"]))
            else:
                raise ValueError(f"unknown state {state!r}")
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            log.warning("ledger %s: skipping corrupt line %d: %s", self.path, lineno, str(exc)[:200])

    def _remember(self, command_id: str, at: float, result: Result) -> Result:
        """Record `result` as the answer for `command_id`, within the output bounds; return what is kept."""
        kept = cap_output(result, self.output_bytes)
        entry = Entry(at=at, result=kept)
        self._entries[command_id] = entry
        for older in self._budget.add(command_id, output_bytes(kept)):
            stale = self._entries.get(older)
            if stale is not None and stale.result is not None:
                stale.result = strip_output(stale.result)
        assert entry.result is not None
        return entry.result

    def _append(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to the kernel."""
        if self._file is None:
            self.open()
        assert self._file is not None
        line = _line(record)
        self._file.write(line)
        self._file.flush()
        self._appended += len(line)

    def compact(self) -> None:
        """Drop expired ids and rewrite the file atomically (temp file + os.replace)."""
        self.prune()
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            for command_id, entry in self._entries.items():
                state = "used" if entry.used else "started"
                fh.write(_line({"id": command_id, "at": entry.at, "state": state}))
                if entry.result is not None:
                    done = {"id": command_id, "at": entry.at, "state": "done", "result": _dump(entry.result)}
                    fh.write(_line(done))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        if self._file is not None:
            self._file.close()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab")
        self._compacted_at = self.clock()
        self._appended = 0

    def prune(self) -> None:
        """Forget ids last touched more than `retention` seconds ago (never one that is running)."""
        horizon = self.clock() - self.retention
        expired = [k for k, e in self._entries.items() if e.at < horizon and k not in self._running]
        for command_id in expired:
            del self._entries[command_id]
            self._budget.discard(command_id)

    def output_held(self) -> int:
        """UTF-8 bytes of output the recorded results hold (at most `max_bytes`)."""
        return self._budget.total

    # ------------------------------------------------------------------ lookups and runs

    def lookup(self, command_id: str) -> Result | None:
        """The answer for an id seen before and not running now, or None if it is new (or expired)."""
        entry = self._entries.get(command_id)
        if entry is None or command_id in self._running or entry.at < self.clock() - self.retention:
            return None
        if entry.result is not None:
            return entry.result
        return ExecError(
            command_id=CommandId(command_id),
            code=ErrorCode.UNKNOWN_RESULT,
            description="this command id started before the agent restarted; its result was lost",
        )

    def replay(self, command_id: str, key: str | None = None) -> ExecError | None:
        """The typed refusal if `command_id` (recorded as `key`) is running or was recorded within the
        retention: `replay`, or `unknown_result` for a command that started before a restart (it may have
        run)."""
        key = key or command_id
        entry = self._entries.get(key)
        if key in self._running:
            why = "is running now"
        elif entry is None or entry.at < self.clock() - self.retention:
            return None
        elif entry.used:
            why = "was already used"
        elif entry.result is None:
            log.warning(
                "command %s refused: it started before the agent restarted; not run again", command_id
            )
            return (
                ExecError(  # it may have run: `unknown_result` says so, where `replay` would say it did not
                    command_id=CommandId(command_id),
                    code=ErrorCode.UNKNOWN_RESULT,
                    description="this command id started before the agent restarted; its result was lost; "
                    "not run again",
                )
            )
        else:
            why = "was already received"
        log.warning("command %s refused (replay): this id %s; nothing ran again", command_id, why)
        return ExecError(
            command_id=CommandId(command_id),
            code=ErrorCode.REPLAY,
            description=f"command id {command_id} {why} on this host; a command runs at most once, so "
            "nothing ran again (a result not yet acknowledged is re-sent by the agent)",
        )

    def learn(self, result: Result) -> bool:
        """Record a finished command's `result` for an id that only *started* here; return whether it did.

        The agent keeps a result in its outbox (on disk) before the ledger records it done, so a crash in
        between leaves an id that started and a result that finished: at the next start the outbox
        hands its results here, and the id answers `replay` (its result is re-sent) instead of
        `unknown_result`. Only an ExecResult counts (an error in the outbox may say that nothing ran), and
        only an id this ledger still holds as started.
        """
        if not isinstance(result, ExecResult):
            return False
        command_id = result.command_id
        entry = self._entries.get(command_id)
        if entry is None or entry.used or entry.result is not None or command_id in self._running:
            return False
        at = max(entry.at, self.clock())
        kept = self._remember(command_id, at, result)
        self._append({"id": command_id, "at": at, "state": "done", "result": _dump(kept)})
        log.info("command %s: result found in the outbox after a restart; recorded as done", command_id)
        return True

    def query(self, command_id: str, not_after: float) -> tuple[QueryState, Result | None]:
        """What the ledger says of `command_id` for a result query; never runs anything.

        ``running`` (running or waiting for a slot); ``done`` with its recorded result, or an
        ``unknown_result`` error if it started before a restart and its result was lost; ``never_ran`` for
        an id recorded as used by an earlier query. An id the ledger does not hold is ``never_ran`` only
        while the clock is not past `not_after` (the not-after of the exec that carried it): every id is
        kept at least until its envelope's not-after, so had it run it would be here; the id is then
        recorded as used until `not_after` (flushed), so an exec with it that still arrives is refused as a
        replay and the answer stays true. Past `not_after` it is ``unknown``: it can no longer start, but it
        may have run and been forgotten.
        """
        if command_id in self._running:
            return "running", None
        now = self.clock()
        entry = self._entries.get(command_id)
        if entry is not None and entry.at >= now - self.retention:
            if entry.used:
                return "never_ran", None
            if entry.result is not None:
                return "done", entry.result
            return "done", ExecError(
                command_id=CommandId(command_id),
                code=ErrorCode.UNKNOWN_RESULT,
                description="this command id started before the agent restarted; its result was lost (it "
                "may have run)",
            )
        if now > not_after:
            return "unknown", None
        # kept until `not_after` (at least `retention`), bounded by the furthest not-after an exec may
        # carry here (`signing.verify_command`: the agent's max ttl, the retention, plus the clock skew)
        keep_until = min(not_after, now + self.retention + CLOCK_SKEW_S)
        at = max(now, keep_until - self.retention)
        self._entries[command_id] = Entry(at=at, used=True)
        self._append({"id": command_id, "at": at, "state": "used"})
        log.info("command %s: asked about, never ran here; its id is now refused", command_id)
        return "never_ran", None

    def claim(self, command_id: str, keep_until: float = 0.0, namespace: str = "rotate") -> ExecError | None:
        """Record `command_id` of an operation that runs no command (recorded as ``<namespace>:<id>``,
        flushed) unless it is a replay; return the refusal if it is."""
        key = f"{namespace}:{command_id}"
        if (refused := self.replay(command_id, key)) is not None:
            return refused
        at = max(self.clock(), keep_until - self.retention)
        self._entries[key] = Entry(at=at, used=True)
        self._append({"id": key, "at": at, "state": "used"})
        return None

    async def run(
        self, request: Exec, runner: Runner, admit: Admit | None = None, keep_until: float = 0.0
    ) -> Result:
        """Run `request` with `runner` at most once per id; a repeated id is refused as a `replay`.

        With `admit`, the command runs only once admitted, as the request admit yields. An ExecError from
        `admit` answers this request and is not recorded: nothing ran, the id stays unused. The id is
        remembered for the retention, and at least until `keep_until` (its envelope's not-after).
        """
        command_id = request.command_id
        if (refused := self.replay(command_id)) is not None:
            return refused
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._running[command_id] = future
        try:
            async with admit(request) if admit is not None else contextlib.nullcontext(request) as admitted:
                if isinstance(admitted, ExecError):
                    future.set_result(admitted)
                    return admitted
                result = await self._record_run(admitted, runner, keep_until - self.retention)
            future.set_result(result)
            return result
        finally:
            del self._running[command_id]
            if not future.done():
                future.cancel()

    async def _record_run(self, request: Exec, runner: Runner, at_least: float = 0.0) -> Result:
        """Record the id as started (flushed), run the command, record its result.

        Entries expire `retention` after their time, which is moved up to `at_least` so the id outlives
        its envelope.
        """
        command_id = request.command_id
        if self.clock() - self._compacted_at > COMPACT_EVERY_S:
            self.compact()
        started = max(self.clock(), at_least)
        self._entries[command_id] = Entry(at=started)
        self._append({"id": command_id, "at": started, "state": "started"})
        try:
            result = await runner(request)
        except Exception as exc:
            log.exception("command %s: runner failed", command_id)
            result = ExecError(command_id=command_id, code=ErrorCode.INTERNAL, description=str(exc)[:500])
        now = max(self.clock(), at_least)
        kept = self._remember(command_id, now, result)
        self._append({"id": command_id, "at": now, "state": "done", "result": _dump(kept)})
        if self._appended > self._budget.max_bytes:
            self.compact()
        return result

    def running(self) -> list[asyncio.Future[Result]]:
        """Futures of the commands running now."""
        return list(self._running.values())


def _dump(result: Result) -> dict[str, Any]:
    """A result as a JSON-ready dict."""
    return result.model_dump(mode="json")


def _line(record: dict[str, Any]) -> bytes:
    """One record as a line of UTF-8 JSON (non-ASCII output is not inflated to \\u escapes)."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
