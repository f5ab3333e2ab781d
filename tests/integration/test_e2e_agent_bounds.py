"""End to end, through real gateway and agent processes: the agent's time bounds hold for the caller."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from shared import subjects
from shared.errors import ErrorCode
from shared.limits import DEFAULT_EXEC_GRACE_S
from shared.protocol import ErrorReply, ExecReply, ExecResult, decode_exec_reply
from tests.support.stack import Stack
from tests.support.trust import TestSigner

pytestmark = pytest.mark.e2e


async def request(
    nc: NATS, signer: TestSigner, host: str, command: str, timeout: float, command_id: str
) -> ExecReply:
    """Send one exec request with the API's patience (timeout + 10 s) and decode the reply."""
    body = signer.exec_body(
        host, json.dumps({"command": command, "timeout": timeout, "command_id": command_id})
    )
    msg = await nc.request(subjects.agent_exec(host), body, timeout=timeout + 10)
    return decode_exec_reply(msg.data)


def pids_with_argv(argv: list[str]) -> list[int]:
    """Pids of the processes whose command line is exactly `argv`."""
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "cmdline").read_bytes() == wanted:
                    found.append(int(entry.name))
    return found


@pytest.fixture
def escaped_sleep() -> Iterator[list[str]]:
    """The argv of a `sleep` with a unique duration; every process running it is killed afterwards."""
    argv = ["sleep", f"30.{uuid.uuid4().int % 10**9:09d}"]
    yield argv
    for pid in pids_with_argv(argv):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_escaped_child_still_gets_its_result_within_default_grace(
    stack: Stack, nc: NATS, escaped_sleep: list[str]
) -> None:
    """A timed-out command whose child escaped with setsid (holding stdout) gets timed_out, not `timeout`.

    The agent waits for the pipes after killing the group, then gives up on them; the gateway's default
    grace must outlast that wait, or the caller hears `timeout` while the result is on its way.
    """
    stack.start_authority()
    gw = stack.start_gateway()  # default exec_grace
    token = stack.add_host("web-1")
    stack.start_agent("agent", "web-1", token, [gw.url])
    started = time.monotonic()
    reply = await request(
        nc, stack.signer, "web-1", f"setsid {' '.join(escaped_sleep)} & sleep 10", 1.0, "escaped-1"
    )
    elapsed = time.monotonic() - started
    assert isinstance(reply, ExecResult), reply
    assert reply.timed_out
    assert reply.exit_code is None
    assert elapsed < 1.0 + DEFAULT_EXEC_GRACE_S
    assert pids_with_argv(escaped_sleep), "the escaped child should still be running (it left the group)"


async def test_commands_waiting_for_a_slot_never_start_late(stack: Stack, nc: NATS, tmp_path: Path) -> None:
    """Over the concurrency cap, a command whose timeout ran out while queued is refused busy, never run.

    16 `sleep 1` with a 1.5 s timeout on an agent running 2 at a time: every caller is answered within
    its timeout (a result, or busy), nobody hears `timeout`, no command starts after its caller's deadline,
    and exactly the commands that started have results.
    """
    stack.start_authority()
    gw = stack.start_gateway()
    token = stack.add_host("web-1")
    stack.start_agent("agent", "web-1", token, [gw.url], max_concurrent_commands=2)
    starts = tmp_path / "starts"
    timeout, count = 1.5, 16

    async def one(i: int) -> tuple[float, float, ExecReply]:
        sent = time.time()
        command = f'echo "{i} $(date +%s.%N)" >> {starts}; sleep 1'
        reply = await request(nc, stack.signer, "web-1", command, timeout, f"queued-{i}")
        return sent, time.time(), reply

    outcomes = await asyncio.gather(*(one(i) for i in range(count)))
    started_at = {int(i): float(t) for i, t in (line.split() for line in starts.read_text().splitlines())}
    ran = set()
    for i, (sent, answered, reply) in enumerate(outcomes):
        assert answered - sent < timeout + 1.0, f"command {i} answered after {answered - sent:.2f}s: {reply}"
        if isinstance(reply, ErrorReply):
            assert reply.code == ErrorCode.BUSY, reply
            assert "nothing ran" in reply.description
        else:
            assert reply.exit_code == 0 or reply.timed_out, reply
            ran.add(i)
        if i in started_at:
            assert started_at[i] - sent < timeout, (
                f"command {i} started {started_at[i] - sent:.2f}s after sending"
            )
    assert set(started_at) == ran
    assert 2 <= len(ran) < count
