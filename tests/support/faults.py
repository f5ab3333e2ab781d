"""A steady stream of REST commands for the fault tests, and the checks that none was lost or run twice.

Each command appends a unique marker to a file on this machine (``echo <marker> >> <file>``), whether the
agent or the SSH worker runs it, so the file says how many times each command really ran.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

FINAL = {"succeeded", "failed", "timed_out", "undeliverable"}
# Outcomes that say the command may have run (once at most): the caller stopped waiting, or the agent's
# session ended after the command was sent. Everything else failed before anything ran, or ran.
MAY_HAVE_RUN_CODES = {"timeout", "disconnected", "orphaned", "unknown_result"}


@dataclass
class Sent:
    """One exec call: its marker, when it was sent and answered, and the answer."""

    marker: str
    sent: float
    answered: float | None = None
    http_status: int | None = None
    body: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def took(self) -> float:
        """Seconds from sending to the answer (or to now, if unanswered)."""
        return (self.answered or time.monotonic()) - self.sent

    @property
    def refused(self) -> bool:
        """Answered 503 "nothing was sent" (the API's NATS connection was down): not accepted, not run."""
        return self.http_status == 503 and "nothing was sent" in str(self.body.get("detail", ""))

    @property
    def status(self) -> str | None:
        """The run's status in the answer."""
        value = self.body.get("status")
        return str(value) if value is not None else None


class CommandStream:
    """`workers` concurrent loops, each POSTing one ``echo <marker> >> marks`` command after another."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        host: str,
        marks: Path,
        workers: int = 2,
        timeout: float = 5.0,
        pause: float = 0.05,
    ) -> None:
        self.http = http
        self.host = host
        self.marks = marks
        self.workers = workers
        self.timeout = timeout
        self.pause = pause
        self.sent: list[Sent] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the loops."""
        self._tasks = [asyncio.create_task(self._loop(w)) for w in range(self.workers)]

    async def stop(self) -> None:
        """Let every loop finish its call in progress, then stop."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _loop(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            await self.send(f"mark-{worker}-{n}")
            n += 1
            await asyncio.sleep(self.pause)

    async def send(self, marker: str, before: str = "") -> Sent:
        """One exec call appending `marker` (after the shell code `before`, e.g. ``sleep 2;``); recorded."""
        entry = Sent(marker, time.monotonic())
        self.sent.append(entry)
        command = {"command": f"{before} echo {marker} >> {self.marks}".strip(), "timeout": self.timeout}
        try:
            answer = await self.http.post(f"/api/hosts/{self.host}/exec", json=command)
            entry.http_status = answer.status_code
            body = answer.json()
            entry.body = body if isinstance(body, dict) else {"detail": body}
        except (httpx.HTTPError, ValueError) as exc:
            entry.error = f"{type(exc).__name__}: {exc}"
        entry.answered = time.monotonic()
        return entry

    def succeeded_after(self, when: float) -> list[Sent]:
        """Calls answered `succeeded` that were sent after `when`."""
        return [s for s in self.sent if s.sent > when and s.status == "succeeded"]

    def longest_gap(self, since: float, until: float) -> float:
        """The longest time in [since, until] with no call answered `succeeded` (the stream's stall)."""
        times = sorted(s.answered for s in self.sent if s.status == "succeeded" and s.answered is not None)
        points = [since] + [t for t in times if since < t < until] + [until]
        return max(b - a for a, b in itertools.pairwise(points))

    def ran(self) -> Counter[str]:
        """How many times each marker is in the marks file."""
        lines = self.marks.read_text().split() if self.marks.exists() else []
        return Counter(lines)

    def accepted(self) -> list[Sent]:
        """The calls the API accepted (recorded and sent): all but the refused ones."""
        return [s for s in self.sent if not s.refused]

    def check(self) -> dict[str, int]:
        """Assert: every call was answered with a final run (HTTP 200), or refused before anything was
        recorded or sent (503 "nothing was sent": then it never ran); a succeeded run's marker is in the
        file exactly once; one that may have run, at most once; any other, never; no marker twice and
        none the stream did not send. Returns the count of each status (``refused``, ``via:<via>``)."""
        ran = self.ran()
        markers = {s.marker for s in self.sent}
        twice = {m: c for m, c in ran.items() if c > 1}
        assert not twice, f"commands ran more than once: {twice}"
        strangers = set(ran) - markers
        assert not strangers, f"markers nobody sent: {sorted(strangers)[:5]}"
        counts: Counter[str] = Counter()
        for s in self.sent:
            if s.refused:
                counts["refused"] += 1
                assert ran[s.marker] == 0, f"{s.marker} ran although it was refused: {s.body}"
                continue
            assert s.error is None, f"{s.marker}: {s.error}"
            assert s.http_status == 200, f"{s.marker}: {s.http_status} {s.body}"
            assert s.status in FINAL, f"{s.marker}: not final: {s.body}"
            counts[str(s.status)] += 1
            counts[f"via:{s.body.get('via')}"] += 1
            code = s.body.get("error_code")
            if s.status == "succeeded":
                assert ran[s.marker] == 1, f"{s.marker} succeeded but ran {ran[s.marker]} times: {s.body}"
            elif s.status == "timed_out" or code in MAY_HAVE_RUN_CODES:
                assert ran[s.marker] <= 1, s.body
            else:
                assert ran[s.marker] == 0, f"{s.marker} ran although it {s.status} ({code}): {s.body}"
        return dict(counts)


async def final_rows(http: httpx.AsyncClient, stream: CommandStream) -> list[dict[str, Any]]:
    """The host's runs in the API's database: one per accepted call, none pending, none for a refused one."""
    answer = await http.get(f"/api/hosts/{stream.host}/commands", params={"limit": 1000})
    assert answer.status_code == 200, answer.text
    rows: list[dict[str, Any]] = answer.json()
    expected = len(stream.accepted())
    assert len(rows) == expected, f"{len(rows)} rows for {expected} accepted commands"
    refused = {f" {s.marker} " for s in stream.sent if s.refused}
    recorded = [r["command"] for r in rows if any(marker in r["command"] for marker in refused)]
    assert not recorded, f"refused commands recorded: {recorded}"
    pending = [r for r in rows if r["status"] not in FINAL]
    assert not pending, f"runs left unsettled: {pending}"
    return rows
