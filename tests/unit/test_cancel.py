"""Cancel, without NATS: the agent's executor kills the process tree, the agent verifies the API's signature,
the gateway's session carries the answer, the SSH worker's remote kill script finds the command's processes
by their marker, and the API records a cancelled result as ``cancelled``."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.agent.commands import Commands
from services.agent.executor import run_command
from services.agent.ledger import Ledger, Result
from services.agent.results import Outbox
from services.api.fleet.runner import outcome_of_result
from services.api.store.models import CommandStatus, Via
from services.fallback_ssh.execution import MARKER, cancel_script, killed_count, wrap_command
from services.gateway.session import CancelAnswered, Session
from shared import signing
from shared.errors import ErrorCode
from shared.ids import CommandId, GatewayId, HostId
from shared.protocol import (
    CancelAnswer,
    CancelRequest,
    ExecResult,
    Hello,
    decode_agent_frame,
    decode_cancel_reply,
    decode_gateway_frame,
    encode,
)
from tests.support.agent_trust import HOST, agent_trust, signed_exec
from tests.support.trust import TestSigner

MIB = 1024 * 1024
CID = CommandId("c-cancel")


def unique_sleep() -> str:
    """A sleep length no other process on the machine has in its argv: the marker the test looks for."""
    return f"{random.randint(300, 399)}.{random.randint(100000, 999999)}"


def pids_with(marker: str) -> list[int]:
    """Live processes (not zombies: their cmdline is empty) whose argv contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry.name))
    return found


async def wait_for_pids(marker: str, at_least: int, within: float = 5.0) -> list[int]:
    deadline = time.monotonic() + within
    while len(found := pids_with(marker)) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {found} run {marker} after {within}s")
        await asyncio.sleep(0.02)
    return found


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(tmp_path / "ledger.jsonl")
    led.open()
    yield led
    led.close()


# ----------------------------------------------------------------------------- the agent's executor


async def test_cancel_kills_the_whole_process_tree_and_keeps_the_output() -> None:
    """A command with a background child: after the cancel neither the shell nor either sleep exists, the
    result says cancelled (not timed out, SIGKILL) with what was printed before."""
    marker = unique_sleep()
    cancel = asyncio.Event()
    task = asyncio.create_task(
        run_command(CID, f"echo before; sleep {marker} & sleep {marker}; echo never", 60, MIB, cancel)
    )
    assert len(await wait_for_pids(marker, 3)) >= 3  # the shell and both sleeps
    started = time.monotonic()
    cancel.set()
    result = await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 2
    assert isinstance(result, ExecResult)
    assert (result.cancelled, result.timed_out, result.exit_code, result.signal) == (
        True,
        False,
        None,
        int(signal.SIGKILL),
    )
    assert result.stdout == "before\n"
    assert pids_with(marker) == []


async def test_a_command_cancelled_before_it_starts_never_runs(tmp_path: Path) -> None:
    cancel = asyncio.Event()
    cancel.set()
    flag = tmp_path / "ran"
    result = await run_command(CID, f"touch {flag}", 5, MIB, cancel)
    assert isinstance(result, ExecResult)
    assert result.cancelled
    assert not flag.exists()


async def test_without_a_cancel_nothing_changes() -> None:
    result = await run_command(CID, "echo ok", 5, MIB, asyncio.Event())
    assert isinstance(result, ExecResult)
    assert (result.exit_code, result.stdout, result.cancelled) == (0, "ok\n", False)


# ----------------------------------------------------------------------------- the agent's commands


async def test_agent_cancels_only_a_signed_cancel_for_itself(ledger: Ledger, tmp_path: Path) -> None:
    """Unsigned, signed by an untrusted key, for another host, expired, or tampered: refused with the typed
    code and the command keeps running; the API-signed cancel kills it and its signed result says cancelled;
    a second cancel then finds it finished; an unknown id is not running."""
    results: dict[str, Result] = {}

    async def deliver(result: Result) -> None:
        results[result.command_id] = result

    signer = TestSigner(tmp_path)
    trust = agent_trust(tmp_path, signer=signer)
    cmds = Commands(ledger, Outbox(), deliver, trust=trust, limit=4, max_output=MIB)
    marker = unique_sleep()
    cmds.start(signed_exec(signer, "long", f"sleep {marker} & sleep {marker}", timeout=60))
    await wait_for_pids(marker, 2)

    plain = CancelRequest(command_id=CommandId("long"))
    stranger = TestSigner(tmp_path, name="stranger.key")
    forged = [
        (plain, ErrorCode.UNSIGNED),
        (stranger.sign("cancel", plain, HOST), ErrorCode.UNKNOWN_KEY),
        (signer.sign("cancel", plain, "web-2"), ErrorCode.WRONG_HOST),
        (
            plain.model_copy(
                update={
                    "signature": signing.sign_command(
                        signer.key, "cancel", signing.signed_fields(plain), HOST, 1.0, 1000.0
                    )
                }
            ),
            ErrorCode.EXPIRED,
        ),
        (signer.sign("exec", plain, HOST), ErrorCode.BAD_SIGNATURE),  # another kind's signature
        (
            signer.sign("cancel", CancelRequest(command_id=CommandId("other")), HOST).model_copy(
                update={"command_id": "long"}
            ),
            ErrorCode.BAD_SIGNATURE,
        ),
    ]
    for request, code in forged:
        assert isinstance(request, CancelRequest)
        answer = cmds.cancel(request)
        assert (answer.state, answer.code) == ("refused", code), answer
    await asyncio.sleep(0.1)
    assert len(pids_with(marker)) >= 2  # still running: nothing was killed

    signed = signer.sign("cancel", plain, HOST)
    assert isinstance(signed, CancelRequest)
    assert cmds.cancel(signed).state == "accepted"
    await cmds.wait(5)
    result = results["long"]
    assert isinstance(result, ExecResult)
    assert result.cancelled
    assert signing.verify_result(trust.key.verify_key, HOST, result)  # the agent's signature covers it
    assert pids_with(marker) == []
    assert cmds.cancel(signed).state == "finished"
    unknown = signer.sign("cancel", CancelRequest(command_id=CommandId("nope")), HOST)
    assert isinstance(unknown, CancelRequest)
    assert cmds.cancel(unknown).state == "not_running"


async def test_a_finished_command_keeps_its_result(ledger: Ledger, tmp_path: Path) -> None:
    results: dict[str, Result] = {}

    async def deliver(result: Result) -> None:
        results[result.command_id] = result

    signer = TestSigner(tmp_path)
    cmds = Commands(
        ledger, Outbox(), deliver, trust=agent_trust(tmp_path, signer=signer), limit=4, max_output=MIB
    )
    cmds.start(signed_exec(signer, "quick", "echo done"))
    await cmds.wait(5)
    request = signer.sign("cancel", CancelRequest(command_id=CommandId("quick")), HOST)
    assert isinstance(request, CancelRequest)
    assert cmds.cancel(request).state == "finished"
    kept = ledger.lookup("quick")
    assert isinstance(kept, ExecResult)
    assert (kept.stdout, kept.cancelled) == ("done\n", False)


# ----------------------------------------------------------------------------- signatures, wire, API


def test_the_cancelled_flag_is_signed_and_old_results_verify_unchanged() -> None:
    key = signing.generate()
    plain = ExecResult(command_id=CID, exit_code=0, duration_ms=1.0)
    before = signing.RESULT_DOMAIN + b'{"command_id":"c-cancel","duration_us":1000,"exit_code":0,'
    assert signing.result_bytes("h", plain).startswith(before)  # no "cancelled" key: same bytes as before
    assert b"cancelled" not in signing.result_bytes("h", plain)
    cancelled = signing.sign_result(key, "h", plain.model_copy(update={"cancelled": True, "exit_code": None}))
    assert signing.verify_result(key.verify_key, "h", cancelled)
    assert not signing.verify_result(key.verify_key, "h", cancelled.model_copy(update={"cancelled": False}))


def test_cancel_frames_round_trip() -> None:
    request = CancelRequest(command_id=CID)
    assert decode_gateway_frame(encode(request)) == request
    answer = CancelAnswer(command_id=CID, state="accepted")
    assert decode_agent_frame(encode(answer)) == answer
    assert decode_cancel_reply(encode(answer)) == answer


def test_a_cancelled_result_is_recorded_cancelled_with_its_output() -> None:
    result = ExecResult(
        command_id=CID, exit_code=None, signal=9, stdout="partial", duration_ms=5, cancelled=True
    )
    outcome = outcome_of_result(result, Via.AGENT, 1000)
    assert (outcome.status, outcome.stdout, outcome.signal) == (CommandStatus.CANCELLED, "partial", 9)
    killed = outcome_of_result(result.model_copy(update={"cancelled": False}), Via.AGENT, 1000)
    assert killed.status == CommandStatus.FAILED


async def test_gateway_session_carries_a_cancel_only_to_an_agent_that_takes_it() -> None:
    def session(capabilities: tuple[str, ...]) -> Session[object]:
        hello = Hello(
            host_id=HostId("h1"), hostname="h", platform="p", agent_version="1", capabilities=capabilities
        )
        return Session(object(), hello, GatewayId("gw"), connected_at=1.0, last_seen=1.0)

    old = session(("exec", "result_query"))
    refused = old.start_cancel(CancelRequest(command_id=CID), 8)
    assert not isinstance(refused, tuple)
    assert refused.code == ErrorCode.UNAVAILABLE
    new = session(("exec", "cancel"))
    started = new.start_cancel(CancelRequest(command_id=CID), 8)
    assert isinstance(started, tuple)
    _, future = started
    again = new.start_cancel(CancelRequest(command_id=CID), 8)
    assert not isinstance(again, tuple)
    assert again.code == ErrorCode.BUSY
    answer = CancelAnswer(command_id=CID, state="accepted")
    actions = new.handle(answer)
    assert len(actions) == 1
    assert isinstance(actions[0], CancelAnswered)
    actions[0].resolve()
    assert future.result() == answer
    assert new.handle(answer) == []  # a late answer: nobody waits
    waiting = new.start_cancel(CancelRequest(command_id=CommandId("c2")), 8)
    assert isinstance(waiting, tuple)
    new.end()
    assert waiting[1].result() is None  # the session ended: the request task answers disconnected


# ----------------------------------------------------------------------------- the SSH worker's kill script


def test_wrap_command_marks_the_command_and_is_unchanged_without_an_id() -> None:
    assert wrap_command("true", 5).startswith("exec timeout -s KILL 5.000 /bin/sh -c ")
    assert wrap_command("true", 5, "abc").startswith(f"exec env {MARKER}=abc timeout -s KILL 5.000 ")
    assert killed_count("killed 3\n") == 3
    assert killed_count("garbage") is None


def test_the_kill_script_kills_every_process_of_the_command_and_no_other() -> None:
    """Run locally as the login shell would: the marked command (GNU timeout, a shell, a background and a
    foreground sleep) is gone afterwards; another command id's processes and an unmarked sleep survive."""
    victim, bystander = unique_sleep(), unique_sleep()
    mine = subprocess.Popen(
        ["/bin/sh", "-c", wrap_command(f"sleep {victim} & sleep {victim}", 60, "victim")],
        start_new_session=True,
    )
    other = subprocess.Popen(
        ["/bin/sh", "-c", wrap_command(f"sleep {bystander} & sleep {bystander}", 60, "bystander")],
        start_new_session=True,
    )
    plain = subprocess.Popen(["sleep", bystander], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while len(pids_with(victim)) < 4 or len(pids_with(bystander)) < 5:  # timeout, sh, 2 sleeps (+1)
            assert time.monotonic() < deadline, (pids_with(victim), pids_with(bystander))
            time.sleep(0.02)
        others = sorted(pids_with(bystander))
        out = subprocess.run(
            ["/bin/sh", "-c", cancel_script("victim")], capture_output=True, text=True, timeout=20, check=True
        )
        assert killed_count(out.stdout) == 4, out
        assert mine.wait(5) == -signal.SIGKILL
        assert pids_with(victim) == []
        assert sorted(pids_with(bystander)) == others
        again = subprocess.run(
            ["/bin/sh", "-c", cancel_script("victim")], capture_output=True, text=True, timeout=20
        )
        assert killed_count(again.stdout) == 0
    finally:
        for proc in (mine, other, plain):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


async def test_a_cancel_right_after_the_exec_frame_is_accepted_and_nothing_starts(
    ledger: Ledger, tmp_path: Path
) -> None:
    """The exec frame and the cancel frame read back to back (the command's task has not run yet): the
    cancel is accepted, nothing is spawned, the result says cancelled."""
    results: dict[str, Result] = {}

    async def deliver(result: Result) -> None:
        results[result.command_id] = result

    signer = TestSigner(tmp_path)
    cmds = Commands(
        ledger, Outbox(), deliver, trust=agent_trust(tmp_path, signer=signer), limit=4, max_output=MIB
    )
    flag = tmp_path / "ran"
    cmds.start(signed_exec(signer, "fast", f"touch {flag}"))
    request = signer.sign("cancel", CancelRequest(command_id=CommandId("fast")), HOST)
    assert isinstance(request, CancelRequest)
    assert cmds.cancel(request).state == "accepted"
    await cmds.wait(5)
    result = results["fast"]
    assert isinstance(result, ExecResult)
    assert result.cancelled
    assert not flag.exists()


async def test_a_cancel_before_the_exec_arrives_makes_its_id_unusable(ledger: Ledger, tmp_path: Path) -> None:
    """With the exec's not-after, a cancel of an id the agent never saw answers never_ran and records the
    id: the exec that arrives afterwards is refused as a replay and runs nothing. Without it (or past it):
    not_running, and nothing is recorded."""
    results: dict[str, Result] = {}

    async def deliver(result: Result) -> None:
        results[result.command_id] = result

    signer = TestSigner(tmp_path)
    cmds = Commands(
        ledger, Outbox(), deliver, trust=agent_trust(tmp_path, signer=signer), limit=4, max_output=MIB
    )
    unknown = signer.sign("cancel", CancelRequest(command_id=CommandId("later")), HOST)
    assert isinstance(unknown, CancelRequest)
    assert cmds.cancel(unknown).state == "not_running"
    past = CancelRequest(command_id=CommandId("later"), exec_not_after=time.time() - 10)
    signed_past = signer.sign("cancel", past, HOST)
    assert isinstance(signed_past, CancelRequest)
    assert cmds.cancel(signed_past).state == "not_running"
    ahead = CancelRequest(command_id=CommandId("later"), exec_not_after=time.time() + 60)
    signed_ahead = signer.sign("cancel", ahead, HOST)
    assert isinstance(signed_ahead, CancelRequest)
    tampered = signed_ahead.model_copy(update={"exec_not_after": time.time() + 600})
    assert cmds.cancel(tampered).code == ErrorCode.BAD_SIGNATURE  # the not-after is signed
    assert cmds.cancel(signed_ahead).state == "never_ran"
    flag = tmp_path / "ran"
    cmds.start(signed_exec(signer, "later", f"touch {flag}"))
    await cmds.wait(5)
    refused = results["later"]
    assert not isinstance(refused, ExecResult)
    assert refused.code == ErrorCode.REPLAY
    assert not flag.exists()
