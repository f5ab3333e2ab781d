"""Result queries through a real gateway on a real nats-server, to a WebSocket fake agent: the query reaches
an agent that announced the capability unchanged (the API's signature passes through) and its answer comes
back as it was sent; an older agent is never sent one (typed `unavailable`, its session stays up); no answer
is a typed `timeout`, a session that ends is `disconnected`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from services.gateway.server import Gateway
from shared import signing, subjects
from shared.errors import ErrorCode
from shared.ids import CommandId, HostId
from shared.protocol import (
    ErrorReply,
    ExecResult,
    ResultAnswer,
    ResultQuery,
    Welcome,
    decode_result_reply,
    encode,
)
from tests.integration.gateway_fixtures import (
    Fleet,
    agent,
    api_client,
    hello,
    nats_server,
    running_gateway,
    token_authority,
)
from tests.support.trust import TestSigner

HOSTS = ("web-1", "web-2")


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with nats_server(tmp_path_factory.mktemp("nats")) as url:
        yield url


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path / "tokens.json", HOSTS)


@pytest.fixture
async def gw(nats_url: str, fleet: Fleet) -> AsyncIterator[Gateway]:
    async with (
        token_authority(nats_url, fleet.path),
        running_gateway(nats_url, gateway_id="gw-query", agent_ping_timeout=0.5) as gateway,
    ):
        yield gateway


@pytest.fixture
async def api(nats_url: str) -> AsyncIterator[NATS]:
    nc = await api_client(nats_url)
    yield nc
    await nc.close()


def _query(tmp_path: Path, host: str, query_id: str = "q-1") -> ResultQuery:
    query = ResultQuery(query_id=CommandId(query_id), command_id=CommandId("c-1"), exec_not_after=123.0)
    signed = TestSigner(tmp_path).sign("result_query", query, host)
    assert isinstance(signed, ResultQuery)
    return signed


async def test_a_query_reaches_a_capable_agent_unchanged_and_its_answer_comes_back(
    gw: Gateway, fleet: Fleet, api: NATS, tmp_path: Path
) -> None:
    async with agent(gw, "web-1", fleet.tokens["web-1"], say_hello=False) as fake:
        await fake.send(hello("web-1").model_copy(update={"capabilities": ("exec", "result_query")}))
        assert isinstance(await fake.recv(), Welcome)
        query = _query(tmp_path, "web-1")
        request = asyncio.ensure_future(api.request(subjects.agent_result("web-1"), encode(query), timeout=5))
        frame = await fake.recv()
        assert frame == query  # the API's signature passes through
        key = signing.generate()
        result = signing.sign_result(key, "web-1", ExecResult(command_id="c-1", exit_code=0, duration_ms=1))
        answer = ResultAnswer(
            query_id=query.query_id, command_id=query.command_id, state="done", result=result
        )
        answer = signing.sign_answer(key, "web-1", answer)
        await fake.send(answer)
        reply = decode_result_reply((await request).data)
        assert reply == answer
        assert (
            signing.answer_problem(signing.parse_public(signing.public_text(key)), "web-1", "q-1", reply)
            is None
        )

        silent = asyncio.ensure_future(
            api.request(subjects.agent_result("web-1"), encode(_query(tmp_path, "web-1", "q-2")), timeout=5)
        )
        assert isinstance(await fake.recv(), ResultQuery)
        timed_out = decode_result_reply((await silent).data)  # the agent never answers q-2
        assert isinstance(timed_out, ErrorReply)
        assert timed_out.code == ErrorCode.TIMEOUT

        pending = asyncio.ensure_future(
            api.request(subjects.agent_result("web-1"), encode(_query(tmp_path, "web-1", "q-3")), timeout=5)
        )
        assert isinstance(await fake.recv(), ResultQuery)
        await fake.ws.close()
        gone = decode_result_reply((await pending).data)
        assert isinstance(gone, ErrorReply)
        assert gone.code in (ErrorCode.DISCONNECTED, ErrorCode.TIMEOUT)


async def test_an_agent_without_the_capability_is_never_sent_a_query(
    gw: Gateway, fleet: Fleet, api: NATS, tmp_path: Path
) -> None:
    async with agent(gw, "web-2", fleet.tokens["web-2"]) as fake:
        msg = await api.request(subjects.agent_result("web-2"), encode(_query(tmp_path, "web-2")), timeout=5)
        reply = decode_result_reply(msg.data)
        assert isinstance(reply, ErrorReply)
        assert reply.code == ErrorCode.UNAVAILABLE
        assert "does not answer result queries" in reply.description
        with pytest.raises(TimeoutError):
            await fake.recv(timeout=0.3)  # nothing was sent to it (keepalives are answered by recv)
        assert gw.bridge.sessions.get(HostId("web-2")) is not None  # and its session is up
        bad = await api.request(subjects.agent_result("web-2"), b"{not json", timeout=5)
        refused = decode_result_reply(bad.data)
        assert isinstance(refused, ErrorReply)
        assert refused.code == ErrorCode.BAD_REQUEST
