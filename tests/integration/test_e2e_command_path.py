"""End to end: a plain NATS request runs a command through real gateway and agent processes."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError

from shared import subjects
from shared.errors import ErrorCode
from shared.protocol import ErrorReply, ExecResult, decode_exec_reply
from tests.support.stack import Stack
from tests.support.trust import TestSigner

pytestmark = pytest.mark.e2e


async def run(
    nc: NATS, signer: TestSigner, host: str, command: str, timeout: float = 10.0, **extra: object
) -> ExecResult:
    """Send an exec request signed as the API would and return the decoded result."""
    body = signer.exec_body(host, json.dumps({"command": command, "timeout": timeout, **extra}))
    msg = await nc.request(subjects.agent_exec(host), body, timeout=timeout + 10)
    reply = decode_exec_reply(msg.data)
    assert isinstance(reply, ExecResult), reply
    return reply


def pid_alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def one_agent(stack: Stack) -> tuple[Stack, str]:
    """Authority, one gateway and one agent for host `web-1`, with a 4 KiB output cap."""
    stack.start_authority()
    gw = stack.start_gateway()
    token = stack.add_host("web-1")
    stack.start_agent("agent", "web-1", token, [gw.url], max_output_bytes=4096)
    return stack, "web-1"


async def test_exec_round_trip_by_plain_request(one_agent: tuple[Stack, str], nc: NATS) -> None:
    """`{"command": ...}` comes back with output, exit code, a command id and a duration."""
    stack, host = one_agent
    body = stack.signer.exec_body(host, b'{"command":"echo out; echo err >&2; exit 3"}')
    msg = await nc.request(subjects.agent_exec(host), body, timeout=10)
    reply = decode_exec_reply(msg.data)
    assert isinstance(reply, ExecResult)
    assert (reply.exit_code, reply.stdout, reply.stderr) == (3, "out\n", "err\n")
    assert not reply.truncated
    assert not reply.timed_out
    assert len(reply.command_id) >= 16
    assert reply.duration_ms > 0


async def test_timeout_kills_the_child_tree(one_agent: tuple[Stack, str], nc: NATS, tmp_path: Path) -> None:
    """A command over its timeout is killed with its whole process group, background children too."""
    stack, host = one_agent
    pidfile = tmp_path / "bg.pid"
    started = time.monotonic()
    reply = await run(nc, stack.signer, host, f"sleep 300 & echo $! > {pidfile}; sleep 300", timeout=1.0)
    assert time.monotonic() - started < 8
    assert reply.timed_out
    assert reply.exit_code is None
    pid = int(pidfile.read_text())
    for _ in range(50):
        if not pid_alive(pid):
            break
        await asyncio.sleep(0.1)
    assert not pid_alive(pid), f"background sleep {pid} survived the timeout"


async def test_output_is_truncated_at_the_cap(one_agent: tuple[Stack, str], nc: NATS) -> None:
    """Output past the agent's cap is cut there and flagged."""
    stack, host = one_agent
    reply = await run(nc, stack.signer, host, "head -c 100000 /dev/zero | tr '\\0' a; echo done >&2")
    assert reply.truncated
    assert reply.stdout == "a" * 4096
    assert reply.stderr == "done\n"
    assert reply.exit_code == 0


async def test_no_agent_means_no_responders_at_once(one_agent: tuple[Stack, str], nc: NATS) -> None:
    """A host with no live session gets NATS's no-responders answer, not a timeout."""
    started = time.monotonic()
    with pytest.raises(NoRespondersError):
        await nc.request(subjects.agent_exec("nobody-here"), b'{"command":"true"}', timeout=5)
    assert time.monotonic() - started < 1.0


async def test_same_command_id_runs_once(one_agent: tuple[Stack, str], nc: NATS, tmp_path: Path) -> None:
    """A repeated command id is refused by the agent's ledger as a `replay`; the command does not run
    again (signed again by the API or not: the id is what is remembered)."""
    stack, host = one_agent
    counter = tmp_path / "runs"
    first = await run(nc, stack.signer, host, f"echo ran >> {counter}; echo first", command_id="fixed-id-1")
    body = stack.signer.exec_body(
        host, json.dumps({"command": f"echo ran >> {counter}", "command_id": "fixed-id-1"})
    )
    second = decode_exec_reply((await nc.request(subjects.agent_exec(host), body, timeout=10)).data)
    assert isinstance(second, ErrorReply)
    assert (second.code, second.command_id) == (ErrorCode.REPLAY, "fixed-id-1")
    assert counter.read_text() == "ran\n"
    assert first.command_id == "fixed-id-1"


async def test_newest_session_wins_across_gateways(stack: Stack, nc: NATS, tmp_path: Path) -> None:
    """Two agents with one token on two gateways: one live session, and 100 commands each run once."""
    stack.start_authority()
    gw1 = stack.start_gateway("gw1")
    gw2 = stack.start_gateway("gw2")
    token = stack.add_host("twin")
    first = stack.start_agent("twin-a", "twin", token, [gw1.url], superseded_backoff=600)
    stack.start_agent("twin-b", "twin", token, [gw2.url], superseded_backoff=600)
    first.wait_for(r"(?i)superseded", timeout=10)
    assert gw1.proc.count("4000") >= 1 or first.count("4000") >= 1

    counter = tmp_path / "count"
    replies: list[ExecResult] = []
    for batch in range(10):  # 10 at a time: under the gateway's in-flight limit
        ids = range(batch * 10, batch * 10 + 10)
        replies += await asyncio.gather(
            *(run(nc, stack.signer, "twin", f"echo {i} >> {counter}") for i in ids)
        )
    assert [r.exit_code for r in replies] == [0] * 100
    lines = counter.read_text().split()
    assert sorted(lines, key=int) == [str(i) for i in range(100)]
    # the superseded agent stayed away: only one session was ever established for it
    assert first.count(r"session \S+ established") == 1


async def test_agent_reconnects_after_gateway_restart_and_kill(stack: Stack, nc: NATS) -> None:
    """The agent comes back after a graceful gateway restart and after a SIGKILL."""
    stack.start_authority()
    gw = stack.start_gateway("gw-r")
    token = stack.add_host("phoenix")
    agent = stack.start_agent("phoenix", "phoenix", token, [gw.url])
    assert (await run(nc, stack.signer, "phoenix", "echo 1")).stdout == "1\n"

    for how in ("term", "kill"):
        seen = agent.count(r"session \S+ established")
        if how == "term":
            assert gw.proc.stop() == 0
        else:
            gw.proc.kill()
        gw = stack.start_gateway(f"gw-r-{how}", port=gw.port)
        deadline = time.monotonic() + 20
        while agent.count(r"session \S+ established") <= seen:
            assert time.monotonic() < deadline, agent.log()[-3000:]
            await asyncio.sleep(0.1)
        assert (await run(nc, stack.signer, "phoenix", f"echo {how}")).stdout == f"{how}\n"
    assert agent.popen.poll() is None
    assert os.path.exists(agent.log_path)
