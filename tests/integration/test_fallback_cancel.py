"""The SSH worker's cancel (``warlock.ssh.<host>.cancel``) against a real sshd: it kills the command's
remote processes (a shell, a background and a foreground sleep), its result then says cancelled; a command
still waiting for a channel never starts; a forged or tampered cancel kills nothing."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from nats.aio.client import Client as NATS

from services.fallback_ssh.execution import KILL
from services.fallback_ssh.worker import Worker
from shared import subjects
from shared.errors import ErrorCode
from shared.ids import CommandId, new_command_id
from shared.protocol import (
    CancelAnswer,
    CancelReply,
    ErrorReply,
    SshCancelRequest,
    SshTarget,
    decode_cancel_reply,
    encode,
)
from tests.integration.test_fallback_exec import (
    HOST,
    StartWorker,
    result,
    run,
    signed,
    sshd,
    start_worker,
    target_of,
    worker,
)
from tests.support.sshd import Sshd

__all__ = ["sshd", "start_worker", "worker"]  # fixtures shared with test_fallback_exec.py


def unique_sleep() -> str:
    return f"{random.randint(300, 399)}.{random.randint(100000, 999999)}"


def pids_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def wait_running(marker: str, at_least: int) -> None:
    deadline = time.monotonic() + 15
    while len(pids_with(marker)) < at_least:
        assert time.monotonic() < deadline, pids_with(marker)
        await asyncio.sleep(0.05)


async def send_cancel(nc: NATS, request: SshCancelRequest) -> CancelReply:
    msg = await nc.request(subjects.ssh_cancel(HOST), encode(request), timeout=30)
    return decode_cancel_reply(msg.data)


def cancel_of(command_id: str, target: SshTarget) -> SshCancelRequest:
    return signed("ssh_cancel", SshCancelRequest(command_id=CommandId(command_id), target=target))


async def test_cancel_kills_the_remote_process_tree(nc: NATS, worker: Worker, sshd: Sshd) -> None:
    target = target_of(sshd)
    marker = unique_sleep()
    command_id = new_command_id()
    running = asyncio.create_task(
        run(nc, target, f"echo up; sleep {marker} & sleep {marker}", command_id=command_id, timeout=60)
    )
    await wait_running(marker, 3)
    unsigned = SshCancelRequest(command_id=CommandId(command_id), target=target)
    moved = cancel_of(command_id, target).model_copy(update={"target": target_of(sshd, port=1)})
    for forged, code in ((unsigned, ErrorCode.UNSIGNED), (moved, ErrorCode.BAD_SIGNATURE)):
        answer = await send_cancel(nc, forged)
        assert isinstance(answer, ErrorReply), answer
        assert answer.code == code
    assert len(pids_with(marker)) >= 3  # nothing killed
    answer = await send_cancel(nc, cancel_of(command_id, target))
    assert isinstance(answer, CancelAnswer), answer
    assert answer.state == "accepted"
    done = result(await asyncio.wait_for(running, 15))
    assert (done.cancelled, done.timed_out, done.signal, done.stdout) == (True, False, KILL, "up\n")
    assert pids_with(marker) == []
    again = await send_cancel(nc, cancel_of(command_id, target))
    assert isinstance(again, CancelAnswer)
    assert again.state == "not_running"


async def test_a_command_waiting_for_a_channel_is_never_started(
    nc: NATS, start_worker: StartWorker, sshd: Sshd, tmp_path: Path
) -> None:
    """One channel per host: the second command waits; cancelled meanwhile, it never runs (its result says
    cancelled, no signal); the first, cancelled too, is killed."""
    await start_worker(max_channels_per_host=1, queue_timeout=20)
    target = target_of(sshd)
    marker = unique_sleep()
    first_id, second_id = new_command_id(), new_command_id()
    flag = tmp_path / "second-ran"
    first = asyncio.create_task(run(nc, target, f"sleep {marker}", command_id=first_id, timeout=60))
    await wait_running(marker, 1)
    second = asyncio.create_task(run(nc, target, f"touch {flag}", command_id=second_id, timeout=60))
    await asyncio.sleep(0.3)
    # the kill script needs a channel too: cancel the first (it frees the channel) after flagging the second
    second_answer = asyncio.create_task(send_cancel(nc, cancel_of(second_id, target)))
    await asyncio.sleep(0.3)
    first_answer = await send_cancel(nc, cancel_of(first_id, target))
    assert isinstance(first_answer, CancelAnswer)
    assert first_answer.state == "accepted"
    assert result(await asyncio.wait_for(first, 15)).cancelled
    late = result(await asyncio.wait_for(second, 15))
    assert (late.cancelled, late.signal, late.exit_code) == (True, None, None)
    answer = await asyncio.wait_for(second_answer, 15)
    assert isinstance(answer, CancelAnswer)
    assert answer.state == "accepted"
    assert not flag.exists()
    assert pids_with(marker) == []


async def test_a_finished_command_is_not_marked_cancelled(nc: NATS, worker: Worker, sshd: Sshd) -> None:
    target = target_of(sshd)
    command_id = new_command_id()
    done = result(await run(nc, target, "echo fine", command_id=command_id))
    answer = await send_cancel(nc, cancel_of(command_id, target))
    assert isinstance(answer, CancelAnswer)
    assert answer.state == "not_running"
    assert (done.cancelled, done.exit_code) == (False, 0)
