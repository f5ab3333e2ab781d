"""Token rotation end to end with the real agent: in-process against a real gateway, and as processes."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from nacl.signing import VerifyKey
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.agent.client import Agent
from services.agent.config import load_agent_config
from services.agent.ledger import Ledger
from services.agent.trust import AgentTrust, load_identity
from services.gateway.server import Gateway
from shared import signing, subjects
from shared.errors import CloseCode, ErrorCode
from shared.ids import CommandId, HostId, new_command_id
from shared.protocol import ErrorReply, RotateOk, RotateRequest, TokenRevoked, decode_rotate_reply, encode
from shared.tokens import generate_token, hash_token
from tests.integration import gateway_fixtures as gf
from tests.support.natsserver import NatsServer
from tests.support.stack import Stack
from tests.support.trust import TestSigner

HOST = HostId("web-1")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No WARLOCK_AGENT_* variable from the outer environment reaches the in-process agent."""
    for name in list(os.environ):
        if name.upper().startswith("WARLOCK_AGENT_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One nats-server for the in-process tests of this module."""
    with gf.nats_server(tmp_path_factory.mktemp("nats")) as url:
        yield url


@pytest.fixture
async def fleet(nats_url: str, tmp_path: Path) -> AsyncIterator[gf.Fleet]:
    """web-1 with a fresh token, served by a token authority."""
    hosts = gf.Fleet(tmp_path / "tokens.json", (HOST,))
    async with gf.token_authority(nats_url, hosts.path):
        yield hosts


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `predicate` until it holds, or fail."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def write_config(path: Path, token: str, url: str, ledger: Path, signer: TestSigner) -> str:
    """Write an agent config file (0600) with a comment and a blank line; return its text."""
    text = (
        "# written by the installer\n"
        f'host_id = "{HOST}"\n'
        f'token = "{token}"\n\n'
        f'gateway_urls = ["{url}"]\n'
        f'trusted_keys = ["{signer.public_key}"]\n'
        f'identity_key_file = "{path.with_suffix(".key")}"\n'
        f'ledger_path = "{ledger}"\n'
        "metrics_interval = 3600.0\nbackoff_initial = 0.05\nbackoff_max = 0.2\n"
    )
    path.write_text(text)
    path.chmod(0o600)
    return text


@pytest.fixture
async def rig(
    nats_url: str, fleet: gf.Fleet, tmp_path: Path
) -> AsyncIterator[tuple[Gateway, NATS, Path, str]]:
    """A gateway, an API-side NATS client, and an agent config file for web-1 (agent not started)."""
    async with gf.running_gateway(nats_url) as gateway:
        path = tmp_path / "agent.conf"
        signer = TestSigner(tmp_path)
        text = write_config(
            path, fleet.tokens[HOST], gf.agent_url(gateway), tmp_path / "ledger.jsonl", signer
        )
        api = await gf.api_client(nats_url)
        try:
            yield gateway, api, path, text
        finally:
            await api.close()


@pytest.fixture
async def run_agent(tmp_path: Path) -> AsyncIterator[Callable[[Path], Agent]]:
    """Factory: run the real agent in-process from a config file; stopped afterwards."""
    running: list[tuple[Agent, asyncio.Task[None], Ledger]] = []

    def start(path: Path) -> Agent:
        settings, store = load_agent_config(path)
        ledger = Ledger(settings.ledger_path)
        ledger.open()
        key = load_identity(settings.identity_key_file)
        trust = AgentTrust(settings.host_id, key, settings.trusted_keys, max_ttl=ledger.retention)
        agent = Agent(settings, ledger, token_store=store, shutdown_grace=1, trust=trust)
        running.append((agent, asyncio.create_task(agent.run()), ledger))
        return agent

    yield start
    for agent, task, ledger in running:
        agent.stop()
        await asyncio.wait_for(task, 10)
        ledger.close()


def established(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The agent's "session ... established" log records so far."""
    return [r for r in caplog.records if "established with" in r.getMessage()]


async def rotate(api: NATS, signer: TestSigner, command_id: str | None = None) -> RotateOk | ErrorReply:
    """Ask web-1's live agent, through the gateway holding it, to make itself a new token (signed)."""
    request = RotateRequest(command_id=CommandId(command_id or new_command_id()))
    body = encode(signer.sign("rotate", request, HOST))
    msg = await api.request(subjects.agent_rotate(HOST), body, timeout=5)
    return decode_rotate_reply(msg.data)


def config_token(path: Path) -> str:
    """The token in an agent config file (read on the host, as the agent does)."""
    return str(tomllib.loads(path.read_text())["token"])


def agent_public_key(path: Path) -> VerifyKey:
    """The public half of the identity key next to the config `path`."""
    return signing.parse_public(signing.public_text(signing.load_private(path.with_suffix(".key"))))


def assert_rotated(answer: RotateOk | ErrorReply, path: Path, old: str, rotation_id: str) -> str:
    """The answer is a RotateOk for the token now in `path`, signed by the agent; return that token."""
    assert isinstance(answer, RotateOk), answer
    assert answer.host_id == HOST
    new = config_token(path)
    assert new != old
    assert answer.token_sha256 == hash_token(new)
    values = signing.rotated_values(HOST, rotation_id, answer.token_sha256)
    assert signing.verify_values(agent_public_key(path), signing.ROTATED_DOMAIN, values, answer.signature)
    other = signing.rotated_values(HOST, rotation_id, hash_token(generate_token()))
    assert not signing.verify_values(agent_public_key(path), signing.ROTATED_DOMAIN, other, answer.signature)
    return new


async def test_rotate_writes_config_then_revoke_reconnects_with_new_token(
    rig: tuple[Gateway, NATS, Path, str],
    fleet: gf.Fleet,
    run_agent: Callable[[Path], Agent],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    nats_server: NatsServer,
) -> None:
    """A signed rotation: the agent makes the token itself; RotateOk carries its hash signed by the agent;
    the file has the new token (0600, other lines byte-for-byte); after revoking the old token the agent's
    next session authenticates with the new one. No token is in a NATS payload or a log line."""
    gateway, api, path, before = rig
    caplog.set_level(logging.INFO)
    old = fleet.tokens[HOST]
    seen: list[bytes] = []

    async def watch(msg: Msg) -> None:
        seen.append(msg.data)

    # nobody may subscribe to ">" any more: watch what the api and a gateway identity can see
    peer = await nats_server.connect("gateway")
    spies = [
        await api.subscribe(f"{subjects.inbox_prefix('api')}.>", cb=watch),  # replies to the api
        await api.subscribe(subjects.ALL_PRESENCE, cb=watch),
        await api.subscribe(subjects.ALL_RESULTS, cb=watch),
        await peer.subscribe("warlock.agent.>", cb=watch),  # requests to gateways
        await peer.subscribe(subjects.TOKEN_REVOKED, cb=watch),
    ]
    run_agent(path)
    await wait_until(lambda: HOST in gateway.sessions)
    answer = await rotate(api, TestSigner(tmp_path), "rot-1")
    new = assert_rotated(answer, path, old, "rot-1")
    assert path.read_text() == before.replace(old, new)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert gateway.sessions[HOST].token_sha256 == hash_token(old)  # the live session keeps its old token
    fleet.tokens[HOST] = new
    fleet.write()
    await api.publish(
        subjects.TOKEN_REVOKED, encode(TokenRevoked(host_id=HOST, token_sha256=hash_token(old)))
    )
    await wait_until(lambda: len(established(caplog)) == 2)
    assert gateway.sessions[HOST].token_sha256 == hash_token(new)
    revoked = [
        r for r in caplog.records if "token revoked" in r.getMessage() and r.name.startswith("services.agent")
    ]
    assert [r.levelno for r in revoked] == [logging.WARNING]
    for spy in spies:
        await spy.unsubscribe()
    await peer.close()
    assert seen
    assert not [data for data in seen if new.encode() in data or old.encode() in data]
    assert old not in caplog.text
    assert new not in caplog.text


async def test_refused_rotations_change_nothing(
    rig: tuple[Gateway, NATS, Path, str],
    fleet: gf.Fleet,
    run_agent: Callable[[Path], Agent],
    tmp_path: Path,
) -> None:
    """Unsigned, signed by an unknown key, for another host, or a replayed rotation id: a typed error,
    and the config file and the agent's token are unchanged."""
    gateway, api, path, before = rig
    agent = run_agent(path)
    await wait_until(lambda: HOST in gateway.sessions)
    signer, stranger = TestSigner(tmp_path), TestSigner(tmp_path, "stranger.key")

    async def ask(request: RotateRequest) -> ErrorReply:
        msg = await api.request(subjects.agent_rotate(HOST), encode(request), timeout=5)
        answer = decode_rotate_reply(msg.data)
        assert isinstance(answer, ErrorReply), answer
        return answer

    unsigned = RotateRequest(command_id=CommandId("r-unsigned"))
    assert (await ask(unsigned)).code == ErrorCode.UNSIGNED
    foreign = stranger.sign("rotate", RotateRequest(command_id=CommandId("r-foreign")), HOST)
    assert (await ask(foreign)).code == ErrorCode.UNKNOWN_KEY  # type: ignore[arg-type]
    elsewhere = signer.sign("rotate", RotateRequest(command_id=CommandId("r-other")), "web-2")
    assert (await ask(elsewhere)).code == ErrorCode.WRONG_HOST  # type: ignore[arg-type]
    assert path.read_text() == before
    assert agent.settings.token.get_secret_value() == fleet.tokens[HOST]
    once = signer.sign("rotate", RotateRequest(command_id=CommandId("r-once")), HOST)
    first = decode_rotate_reply(
        (await api.request(subjects.agent_rotate(HOST), encode(once), timeout=5)).data
    )
    rotated = assert_rotated(first, path, fleet.tokens[HOST], "r-once")
    replayed = await ask(once)  # type: ignore[arg-type]
    assert replayed.code == ErrorCode.REPLAY
    assert config_token(path) == rotated


async def test_rotate_with_environment_token_is_refused(
    rig: tuple[Gateway, NATS, Path, str],
    fleet: gf.Fleet,
    run_agent: Callable[[Path], Agent],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """WARLOCK_AGENT_TOKEN set: typed exec_failed naming the environment; the file is not touched."""
    gateway, api, path, before = rig
    monkeypatch.setenv("WARLOCK_AGENT_TOKEN", fleet.tokens[HOST])
    agent = run_agent(path)
    await wait_until(lambda: HOST in gateway.sessions)
    answer = await rotate(api, TestSigner(tmp_path))
    assert isinstance(answer, ErrorReply)
    assert answer.code == ErrorCode.EXEC_FAILED
    assert "token is set by the environment; update it there" in answer.description
    assert path.read_text() == before
    assert agent.settings.token.get_secret_value() == fleet.tokens[HOST]


async def test_agent_process_rotate_then_revoke(stack: Stack, nats_server: NatsServer) -> None:
    """Real authority, gateway and agent processes: rotate, switch the authority, revoke the old token;
    the agent logs the 4003 close and a second established session, and its config holds the new token."""
    stack.start_authority()
    gateway = stack.start_gateway()
    old = stack.add_host(HOST)
    agent = stack.start_agent("agent", HOST, old, [gateway.url])
    config = stack.root / "agent.conf"
    before = config.read_text()
    api = await nats_server.connect("api")
    try:
        answer = await rotate(api, stack.signer, "rot-proc")
        new = assert_rotated(answer, config, old, "rot-proc")
        assert config.read_text() == before.replace(old, new)
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        stack.add_host(HOST, new)
        revoked = TokenRevoked(host_id=HOST, token_sha256=hash_token(old))
        await api.publish(subjects.TOKEN_REVOKED, encode(revoked))
    finally:
        await api.close()
    await asyncio.to_thread(agent.wait_for, r"token revoked", 5)
    await asyncio.to_thread(agent.wait_for, r"(?s)token revoked.*session \S+ established with", 5)
    assert agent.count(r"session \S+ established with") == 2
    assert f"closing {int(CloseCode.TOKEN_REVOKED)}" in gateway.proc.log()
    for proc in (agent, gateway.proc):
        assert old not in proc.log()
        assert new not in proc.log()
