"""The SSH worker's verifier, sans-I/O: signatures per kind and host, expiry, bounded replay memory."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.fallback_ssh.trust import ReplayMemory, Verifier
from shared import signing
from shared.errors import ErrorCode
from shared.protocol import SshExecRequest, SshProbeRequest, SshTarget
from shared.signing import CommandRefused

KEY = signing.generate()
TARGET = SshTarget(address="10.0.0.5", port=22, username="root", host_key="ssh-ed25519 AAAA")


class Clock:
    """A settable clock."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def exec_request(
    command_id: str = "c1", host: str = "web1", ttl: float = 60, now: float = 1_000_000.0
) -> SshExecRequest:
    """A signed SSH exec request."""
    request = SshExecRequest(command="uptime", command_id=command_id, target=TARGET)
    sig = signing.sign_command(KEY, "ssh_exec", signing.signed_fields(request), host, ttl, now=now)
    return request.model_copy(update={"signature": sig})


def verifier(clock: Clock, capacity: int = 100) -> Verifier:
    """A verifier trusting KEY on `clock`."""
    return Verifier([signing.public_text(KEY)], max_ttl=600, capacity=capacity, clock=clock)


def refused(code: ErrorCode, call: Callable[[], object]) -> None:
    """`call` raises CommandRefused with `code`."""
    with pytest.raises(CommandRefused) as caught:
        call()
    assert caught.value.code == code


def test_good_request_then_replay() -> None:
    """A signed request verifies once; the same id again is a replay."""
    clock = Clock()
    v = verifier(clock)
    assert v.check("ssh_exec", exec_request(), "web1", "c1") == signing.key_id(KEY)
    refused(ErrorCode.REPLAY, lambda: v.check("ssh_exec", exec_request(), "web1", "c1"))


def test_kind_host_and_target_are_covered() -> None:
    """Another kind, another host, another target: refused before anything is remembered."""
    clock = Clock()
    v = verifier(clock)
    refused(ErrorCode.BAD_SIGNATURE, lambda: v.check("exec", exec_request(), "web1", "c1"))
    refused(ErrorCode.WRONG_HOST, lambda: v.check("ssh_exec", exec_request(host="web2"), "web1", "c1"))
    moved = exec_request().model_copy(update={"target": TARGET.model_copy(update={"address": "6.6.6.6"})})
    refused(ErrorCode.BAD_SIGNATURE, lambda: v.check("ssh_exec", moved, "web1", "c1"))
    assert len(v.replays) == 0
    v.check("ssh_exec", exec_request(), "web1", "c1")


def test_probe_without_id_is_remembered_by_its_signature() -> None:
    """A probe has no command id: its signature is what a replay repeats."""
    clock = Clock()
    v = verifier(clock)
    probe = SshProbeRequest(host_id="web1", address="10.0.0.5", username="root")
    sig = signing.sign_command(KEY, "probe", signing.signed_fields(probe), "web1", 60, now=clock.now)
    probe = probe.model_copy(update={"signature": sig})
    v.check("probe", probe, "web1")
    refused(ErrorCode.REPLAY, lambda: v.check("probe", probe, "web1"))


def test_ids_are_forgotten_after_not_after_and_then_refused_as_expired() -> None:
    """After its not-after an id leaves memory; the request itself is refused as expired then."""
    clock = Clock()
    v = verifier(clock)
    request = exec_request(ttl=60, now=clock.now)
    v.check("ssh_exec", request, "web1", "c1")
    clock.now += 61
    refused(ErrorCode.EXPIRED, lambda: v.check("ssh_exec", request, "web1", "c1"))
    v.check("ssh_exec", exec_request("c2", now=clock.now), "web1", "c2")
    assert len(v.replays) == 1  # c1 was dropped when c2 came in


def test_memory_is_bounded_and_full_means_busy_not_unremembered() -> None:
    """At capacity with every id still live, a new request is busy (nothing ran); once some expire, room."""
    clock = Clock()
    memory = ReplayMemory(capacity=3, clock=clock)
    for i in range(3):
        memory.remember(f"c{i}", clock.now + 10 + i)
    refused(ErrorCode.BUSY, lambda: memory.remember("c9", clock.now + 10))
    clock.now += 10.5
    memory.remember("c9", clock.now + 10)
    assert len(memory) == 3
    refused(ErrorCode.REPLAY, lambda: memory.remember("c1", clock.now + 10))
